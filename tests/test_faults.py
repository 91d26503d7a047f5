"""Faults a long run meets besides a kill, created for real: a full disk, an output folder that turns
read-only or disappears, damaged files on disk, and one torchrun worker SIGKILLed.

The full disk is a small tmpfs mounted for the test where the machine allows it (root, as on CI).
Elsewhere a file-size limit (RLIMIT_FSIZE) on the writing process makes the same writes fail (EFBIG
instead of ENOSPC), and read-only is a chmod (instead of a read-only remount; root ignores
permission bits, so without a mount that case is skipped). PREFALIGN_TEST_NO_MOUNT=1 forces the
fallbacks. Every mount is unmounted when its test ends.

Each fault must end the run with one clear message (exit 3), leave no temporary files, keep the
last complete checkpoint intact, and `--resume` must then continue from it (the end-to-end tests
compare the resumed run bit for bit with an uninterrupted one, as tests/test_resume.py does).
"""
import contextlib
import errno
import json
import os
import pickle
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from prefalign.cli import main as cli_main
from prefalign.errors import DiskError, ModelError
from prefalign.stages.common import save_model_final
from prefalign.stages.ref_cache import read_cache, write_cache
from prefalign.rl.value_head import HEAD_FILE, SUM_FILE, load_value_head, save_value_head
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer
from prefalign.train import checkpoint as ckpt
from prefalign.train import diskio
from prefalign.train.logger import MetricsLogger, read_metrics, write_summary
from conftest import run_cli
from test_loop import CPU
from test_resume import (ENV, KILL_AFTER, STAGES, assert_same_run, checkpoint_done, reward_model, sft_args,
                         stage_or_skip, uninterrupted, wait_until, work)  # noqa: F401 (work: the shared workspace fixture)

RUN_ENV = {**ENV, "PREFALIGN_CACHE": ""}  # set per workspace: DPO's reference cache stays in the test's folder
FSIZE_LIMIT = 64 * 1024  # the file-size limit that stands in for a full disk where no tmpfs can be mounted


# ----------------------------------------------------------------------------- a disk that refuses writes

class SmallDisk:
    """A folder whose writes the test makes fail for real.

    A tmpfs of ``size_kb`` where mounting works: ``fill`` takes its last free page (ENOSPC), ``read_only``
    remounts it read-only (EROFS). Elsewhere ``fill`` sets a file-size limit on the writing process
    (EFBIG) and ``read_only`` takes the write permission away (EACCES)."""

    def __init__(self, path: Path, size_kb: int):
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        self.tmpfs = not os.environ.get("PREFALIGN_TEST_NO_MOUNT") and _mount(path, size_kb)
        self.filler = path / "filler"
        self._limited: list[tuple[int, tuple[int, int]]] = []  # (pid, old limit) to put back
        self._locked = False

    @property
    def full_words(self) -> str:
        return "no space left on the device" if self.tmpfs else "file too large"

    def fill(self, pid: int = 0) -> None:
        """Make the next writes fail as on a full disk (of process ``pid``; 0: this one)."""
        if not self.tmpfs:
            old = resource.prlimit(pid, resource.RLIMIT_FSIZE)
            resource.prlimit(pid, resource.RLIMIT_FSIZE, (FSIZE_LIMIT, old[1]))
            self._limited.append((pid, old))
            return
        fd = os.open(self.filler, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            for block in (1 << 16, 1 << 12, 1):  # down to the last byte of the last page
                with contextlib.suppress(OSError):
                    while True:
                        os.write(fd, b"\0" * block)
        finally:
            os.close(fd)

    def free(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.filler.unlink()
        for pid, old in reversed(self._limited):
            with contextlib.suppress(ProcessLookupError):
                resource.prlimit(pid, resource.RLIMIT_FSIZE, old)
        self._limited.clear()

    def read_only(self, stopped_pid: int | None = None) -> None:
        """Writes under the folder fail from now on. A remount waits for files open for writing to
        close (EBUSY): a stopped writer is let run a few milliseconds at a time until they are."""
        if not self.tmpfs:
            for p in [self.path, *self.path.rglob("*")]:
                p.chmod(p.stat().st_mode & ~0o222)
            self._locked = True
            try:
                (self.path / "probe").touch()
            except PermissionError:
                return
            (self.path / "probe").unlink()
            self.writable()
            pytest.skip("this process ignores permission bits (root), and no tmpfs could be mounted to remount "
                        "read-only")
        for _ in range(500):
            if subprocess.run(["mount", "-o", "remount,ro", str(self.path)], capture_output=True).returncode == 0:
                self._locked = True
                return
            if stopped_pid is None:
                break
            os.kill(stopped_pid, signal.SIGCONT)
            time.sleep(0.002)
            os.kill(stopped_pid, signal.SIGSTOP)
        pytest.fail(f"could not remount {self.path} read-only")

    def writable(self) -> None:
        if not self._locked:
            return
        if self.tmpfs:
            subprocess.run(["mount", "-o", "remount,rw", str(self.path)], check=True)
        else:
            for p in [self.path, *self.path.rglob("*")]:
                p.chmod(p.stat().st_mode | 0o200)
        self._locked = False

    @contextlib.contextmanager
    def limited_from_start(self):
        """Processes started inside meet a full disk from their first write (rlimit mode: they inherit
        the limit; tmpfs mode: the tmpfs is sized small instead)."""
        if not self.tmpfs:
            self.fill()
        try:
            yield
        finally:
            self.free()

    def close(self) -> None:
        try:
            self.writable()
            self.free()
        finally:
            if self.tmpfs and subprocess.run(["umount", str(self.path)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(self.path)], capture_output=True)


def _mount(path: Path, size_kb: int) -> bool:
    try:
        proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_kb}k,mode=0755", "tmpfs", str(path)],
                              capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """small_disk(size_kb) -> a SmallDisk under tmp_path. SIGXFSZ is ignored meanwhile (in this process
    and, inherited, in its children), so a file-size limit makes writes fail with EFBIG instead of
    killing the writer."""
    disks = []
    old = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)

    def make(size_kb: int = 8192) -> SmallDisk:
        disks.append(SmallDisk(tmp_path / f"disk{len(disks)}", size_kb))
        return disks[-1]

    try:
        yield make
    finally:
        for d in disks:
            with contextlib.suppress(Exception):  # every disk is unmounted, whatever the test left
                d.close()
        signal.signal(signal.SIGXFSZ, old)


def state(step, n=64 * 1024):
    return {"model": {"w": torch.full((n,), float(step))}, "optimizer": {}, "scheduler": {}, "rng": ckpt.rng_state(),
            "position": {"step": step}}


def temporaries(root: Path) -> list[Path]:
    """What a write leaves behind when it is cut short: temp folders and files of every writer."""
    return [p for p in root.rglob("*") if p.name.startswith((".tmp-", ".final-tmp", ".del-")) or p.name.endswith(".tmp")]


def complete_steps(out: Path) -> list[str]:
    return sorted(p.name for p in (out / ckpt.CKPT_DIR).glob("step-*") if ckpt.is_complete(p))


# ----------------------------------------------------------------------------- full disk, in this process

def test_checkpoint_on_a_full_disk_keeps_the_last_one_and_says_what_to_do(small_disk):
    disk = small_disk()
    out = disk.path / "run"
    ckpt.save_checkpoint(out, 1, state(1), keep=1)
    disk.fill()
    with pytest.raises(DiskError) as e:
        ckpt.save_checkpoint(out, 2, state(2), keep=1)
    disk.free()
    msg = str(e.value)
    assert e.value.exit_code == 3 and e.value.errno in (errno.ENOSPC, errno.EFBIG)
    assert disk.full_words in msg and "step-000000002" in msg
    assert f"({diskio.human(ckpt.nbytes(state(2)))})" in msg  # the space it needed: 267.2 kB of tensors
    assert "rerun with --resume" in msg and f"{out / ckpt.CKPT_DIR / 'step-000000001'}, which is intact" in msg
    if disk.tmpfs:
        assert f"Free at least {diskio.human(ckpt.nbytes(state(2)))} there" in msg and "0 bytes free in" in msg
    assert not temporaries(out) and complete_steps(out) == ["step-000000001"]
    assert ckpt.load_latest(out)[1]["position"]["step"] == 1
    ckpt.save_checkpoint(out, 2, state(2), keep=1)  # space freed: saving works again and prunes as before
    assert complete_steps(out) == ["step-000000002"]


def test_final_model_and_summary_on_a_full_disk(small_disk):
    disk = small_disk()
    out = disk.path / "run"
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    model = tiny_llama(tok)
    write_summary(out, {"stage": "x"})
    (out / "summary.json").unlink()
    disk.fill()
    with pytest.raises(DiskError, match="the final model into") as e:
        save_model_final(out, CPU, model, tok)
    assert "no checkpoint is complete yet" in str(e.value)
    assert diskio.human(ckpt.nbytes(model.state_dict())) in str(e.value)
    assert not temporaries(out) and not (out / "config.json").exists()
    if disk.tmpfs:  # a file-size limit refuses only big files: summary.json is small
        with pytest.raises(DiskError, match="summary.json"):
            write_summary(out, {"stage": "x"})
        assert not temporaries(out) and not (out / "summary.json").exists()
    disk.free()
    save_model_final(out, CPU, model, tok)
    write_summary(out, {"stage": "x"})
    assert (out / "config.json").exists() and (out / "model.safetensors").exists() and not temporaries(out)


def test_a_metrics_row_the_disk_refuses_is_cut_off(small_disk):
    disk = small_disk()
    out = disk.path / "run"
    log = MetricsLogger(out)
    log.log({"step": 1, "loss": 1.0})
    disk.fill()
    with pytest.raises(DiskError, match="metrics.jsonl"):
        for step in range(2, 10_000):  # the last page of metrics.jsonl still takes a few rows
            log.log({"step": step, "loss": 1.0, "pad": "x" * 300})
    disk.free()
    rows = read_metrics(out / "metrics.jsonl")  # every line whole: the half-written one was cut off
    assert rows[-1]["step"] == step - 1 and rows[0]["step"] == 1
    log.log({"step": step, "loss": 1.0})
    assert read_metrics(out / "metrics.jsonl")[-1]["step"] == step


def test_reference_cache_entry_on_a_full_disk(small_disk):
    disk = small_disk()
    path = disk.path / "cache" / "key.json"
    values = torch.randn(3000, 2, dtype=torch.float64)  # about 120 kB of JSON: above the file-size limit too
    disk.fill()
    with pytest.raises(DiskError, match="--ref-cache-dir") as e:
        write_cache(path, values, {"pairs": 3000})
    assert str(path) in str(e.value) and disk.full_words in str(e.value)
    disk.free()
    assert not temporaries(disk.path) and not path.exists()
    write_cache(path, values, {"pairs": 3000})
    assert torch.equal(read_cache(path, 3000), values)


def test_disk_error_crosses_ranks_and_collective_save_raises_it(small_disk):
    e = DiskError("no space left", path="/x", errno=errno.ENOSPC)
    back = pickle.loads(pickle.dumps(e))  # how rank 0's error reaches the other ranks
    assert (type(back), str(back), back.path, back.errno, back.exit_code) == (DiskError, "no space left", "/x",
                                                                               errno.ENOSPC, 3)
    disk = small_disk()
    disk.fill()
    with pytest.raises(DiskError):
        ckpt.save_checkpoint_collective(disk.path / "run", 1, state(1), 2, CPU)


def test_library_errors_are_traced_back_to_the_os_error():
    """safetensors words a refused write as "(os error 28)"; torch.save, once some records went
    through, as "unexpected pos N vs M": the file it writes through keeps the OSError."""
    err = diskio.os_error_of(RuntimeError("Error while serializing: I/O error: No space left on device (os error 28)"))
    assert err.errno == errno.ENOSPC and diskio.os_error_of(RuntimeError("unexpected pos 704 vs 598")) is None

    class FillsUp:
        def __init__(self):
            self.calls = 0

        def write(self, data):
            self.calls += 1
            if self.calls > 3:
                raise OSError(errno.ENOSPC, "No space left on device")
            return len(data)

        def flush(self):
            pass
    refused = diskio._CountingFile(FillsUp())
    with pytest.raises(RuntimeError, match="unexpected pos"):
        torch.save({"w": torch.zeros(1000)}, refused)
    assert refused.error.errno == errno.ENOSPC  # what write_stream raises instead


def test_a_writer_that_hides_the_cause_is_explained_by_a_probe(small_disk):
    """torch.save to a path reports a full disk as "basic_ios::clear: iostream error", no errno left."""
    disk = small_disk()
    disk.fill()
    big = {"w": torch.zeros(300_000)}
    with pytest.raises(DiskError, match=disk.full_words):
        with diskio.guarded(disk.path / "x.pt", needed=ckpt.nbytes(big)):
            torch.save(big, disk.path / "x.pt")
    disk.free()
    with pytest.raises(KeyError):  # where writing works, other errors pass unchanged
        with diskio.guarded(disk.path / "y"):
            raise KeyError("y")


# ----------------------------------------------------------------------------- read-only or gone, in this process

def test_output_turning_read_only_stops_writes_and_keeps_the_checkpoint(small_disk):
    disk = small_disk()
    out = disk.path / "run"
    log = MetricsLogger(out)
    log.log({"step": 1})
    ckpt.save_checkpoint(out, 1, state(1))
    disk.read_only()
    with pytest.raises(DiskError, match="read-only file system|permission denied") as e:
        ckpt.save_checkpoint(out, 2, state(2))
    assert "step-000000001, which is intact" in str(e.value)
    with pytest.raises(DiskError, match="metrics.jsonl"):
        log.log({"step": 2})
    disk.writable()
    assert complete_steps(out) == ["step-000000001"] and not temporaries(out)
    ckpt.save_checkpoint(out, 2, state(2))
    log.log({"step": 2})


def test_output_read_only_from_the_start_is_refused_before_any_work(small_disk, capsys):
    disk = small_disk()
    disk.read_only()
    assert cli_main(["sft", "--model", "no-model", "--data", "no-data.jsonl", "--output", str(disk.path / "run")]) == 2
    assert f"--output {disk.path / 'run'}: {disk.path} is not writable" in capsys.readouterr().err
    assert not (disk.path / "run").exists()


def test_output_that_disappears_is_not_created_again(tmp_path):
    out = tmp_path / "run"
    log = MetricsLogger(out)
    log.log({"step": 1})
    ckpt.save_checkpoint(out, 1, state(1, n=8))
    out.rename(tmp_path / "moved")  # deleted, moved away or unmounted while the run goes on
    for write in (lambda: log.log({"step": 2}), lambda: ckpt.save_checkpoint(out, 2, state(2, n=8)),
                  lambda: write_summary(out, {})):
        with pytest.raises(DiskError, match=f"{out} is gone while the run was writing into it"):
            write()
    assert not out.exists()
    out.mkdir()  # an empty folder in its place (a mount point left by an unmount) is not the same OUTPUT
    with pytest.raises(DiskError, match="was replaced by another folder"):
        log.log({"step": 2})
    out.rmdir()
    (tmp_path / "moved").rename(out)  # put back: the run could have gone on
    log.log({"step": 2})
    MetricsLogger(out)  # a new run in the same place starts afresh
    out.rename(tmp_path / "moved")
    out.mkdir()
    MetricsLogger(out).log({"step": 1})


# ----------------------------------------------------------------------------- damaged files

def flip_byte(path: Path, at: int) -> None:
    data = bytearray(path.read_bytes())
    data[at] ^= 0x01
    path.write_bytes(bytes(data))


def test_bit_flipped_checkpoint_is_skipped_for_the_older_one(tmp_path, capsys):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, state(step, n=4096), keep=2)
    newest = tmp_path / ckpt.CKPT_DIR / "step-000000002"
    step, size, digest = (newest / ckpt.MARKER).read_text().split()
    assert int(size) == (newest / ckpt.STATE).stat().st_size and digest == diskio.file_sha256(newest / ckpt.STATE)
    flip_byte(newest / ckpt.STATE, int(size) // 2)  # inside the tensor data: torch.load alone would not notice
    assert torch.load(newest / ckpt.STATE, weights_only=False)["position"]["step"] == 2
    path, loaded = ckpt.load_latest(tmp_path)
    assert path.name == "step-000000001" and loaded["position"]["step"] == 1
    err = capsys.readouterr().err
    assert f"skipping checkpoint {newest}: state.pt does not match the sha256 recorded in COMPLETE" in err


def test_damaged_reference_cache_entries_are_reported_and_recomputed(tmp_path, capsys):
    path = tmp_path / "entry.json"
    values = torch.tensor([[-1.25, -2.5], [-3.0625, -4.75]], dtype=torch.float64)
    write_cache(path, values, {"pairs": 2})
    assert torch.equal(read_cache(path, 2), values)
    text = path.read_text()
    path.write_text(text.replace("-3.0625", "-3.0626"))  # a changed digit still parses
    assert read_cache(path, 2) is None
    assert "does not match the sha256 recorded in it (damaged on disk); computing it again" in capsys.readouterr().err
    path.write_text(text[:len(text) // 2])  # truncated
    assert read_cache(path, 2) is None and "cannot be read" in capsys.readouterr().err
    body = json.loads(text)
    del body["sha256"]
    path.write_text(json.dumps(body))  # an entry of an older version: nothing to check it against
    assert read_cache(path, 2) is None and "has no checksum" in capsys.readouterr().err


def test_damaged_value_head_is_refused(tmp_path):
    head = torch.nn.Linear(32, 1)
    save_value_head(head, tmp_path / "value_model")
    file = tmp_path / "value_model" / HEAD_FILE
    assert (tmp_path / "value_model" / SUM_FILE).read_text().split() == [str(file.stat().st_size),
                                                                       diskio.file_sha256(file)]
    assert torch.equal(load_value_head(str(tmp_path / "value_model"), 32)["weight"], head.weight)
    good = file.read_bytes()
    flip_byte(file, len(good) - 300)
    with pytest.raises(ModelError, match="is damaged: it does not match the sha256 in value_head.sha256"):
        load_value_head(str(tmp_path / "value_model"), 32)
    file.write_bytes(good[:-10])
    with pytest.raises(ModelError, match="is damaged: it has .* bytes, value_head.sha256 recorded"):
        load_value_head(str(file), 32)
    file.write_bytes(good)
    (tmp_path / "value_model" / SUM_FILE).unlink()  # a head from before checksums: still loads
    assert torch.equal(load_value_head(str(file), 32)["bias"], head.bias)


# ----------------------------------------------------------------------------- end to end: real runs

def launch(args, log_path: Path, env=None):
    """The CLI as a background process, its output in a file (a full pipe would block it). It keeps
    SIGXFSZ ignored (restore_signals=False): a file-size limit then refuses writes instead of killing."""
    log = open(log_path, "w+")
    proc = subprocess.Popen([sys.executable, "-m", "prefalign", *map(str, args)], stdout=log, stderr=subprocess.STDOUT,
                            text=True, env={**os.environ, **ENV, **(env or {})}, restore_signals=False)
    return proc, log


def finished(proc, log, timeout=300) -> tuple[int, str]:
    rc = proc.wait(timeout=timeout)
    log.seek(0)
    return rc, log.read()


def stop_message(text: str, stage: str) -> str:
    """The one line a person reads: `prefalign STAGE: stopped: ...`, with no traceback."""
    assert "Traceback" not in text, text[-4000:]
    layout = (f"prefalign {stage}: packed rows", f"prefalign {stage}: padded rows")  # the run's layout notice
    lines = [line for line in text.splitlines() if line.startswith(f"prefalign {stage}: ")
             and not line.startswith(layout)]
    assert len(lines) == 1 and lines[0].startswith(f"prefalign {stage}: stopped: "), text[-4000:]
    return lines[0]


def fill(disk: SmallDisk, out: Path, pid: int):
    disk.fill(pid)
    return disk.free


def read_only(disk: SmallDisk, out: Path, pid: int):
    disk.read_only(stopped_pid=pid)
    return disk.writable


def vanish(disk: SmallDisk, out: Path, pid: int):
    away = out.with_name(out.name + "-moved")
    out.rename(away)
    return lambda: away.rename(out)


FAULTS = {"full": fill, "read-only": read_only, "vanished": vanish}
# Every stage meets a full disk; the two loops (fit()'s and PPO's) then an OUTPUT turned read-only,
# then one that vanished, each fault met by the run resumed after the one before.
CHAINS = {"sft": ("full", "read-only", "vanished"), "reward": ("full",), "dpo": ("full",),
          "ppo": ("full", "read-only", "vanished")}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CHAINS))
def test_faults_mid_run_stop_cleanly_and_resume_is_exact(work, small_disk, monkeypatch, name):
    """For each fault in turn: the run is paused (SIGSTOP) once one more checkpoint is complete, the
    fault is made, and the run goes on into it: exit 3 with one message, every complete checkpoint
    intact (size and sha256). With the fault undone, --resume continues; the last one ends where an
    uninterrupted run ends, bit for bit."""
    monkeypatch.setenv("PREFALIGN_CACHE", str(work / "cache"))  # DPO's reference cache
    stage = stage_or_skip(name)
    ref = uninterrupted(work, name)
    disk = small_disk(16 * 1024)
    out = disk.path / "run"
    args = [*stage.args(work), "--output", out]
    for i, fault in enumerate(CHAINS[name]):
        done = complete_steps(out) if out.exists() else []
        proc, log = launch([*args, *(["--resume"] if i else [])], disk.path.with_suffix(f".{i}.log"))
        wait_until(proc, log, checkpoint_done(out, int(done[-1][5:]) + 1 if done else KILL_AFTER))
        os.kill(proc.pid, signal.SIGSTOP)
        try:
            undo = FAULTS[fault](disk, out, proc.pid)
        finally:
            os.kill(proc.pid, signal.SIGCONT)
        rc, text = finished(proc, log)
        undo()
        assert rc == 3, text[-4000:]
        line = stop_message(text, name)
        expected = {"full": disk.full_words, "read-only": "read-only file system|permission denied",
                    "vanished": "is gone while the run|disappeared while the run"}[fault]
        assert re.search(expected, line) and "--resume" in line, line
        steps = complete_steps(out)
        assert all(ckpt._check(out / ckpt.CKPT_DIR / s) is None for s in steps)  # sizes and sha256 hold
        assert steps[-1] > (done[-1] if done else "") and not (out / "summary.json").exists()
        if fault == "full":  # (a read-only or moved folder may keep a temporary one: the next save removes it)
            assert not temporaries(out) and f"{steps[-1]}, which is intact" in line
    finished_run = run_cli(*args, "--resume", env=ENV)
    assert f"resumed from {out / ckpt.CKPT_DIR / steps[-1]}" in finished_run.stderr
    assert not temporaries(out)
    assert_same_run(ref, out, stage)


@pytest.mark.slow
@pytest.mark.parametrize("save_steps", [0, 2])
def test_sft_on_a_disk_too_small_stops_with_one_message(work, small_disk, tmp_path, save_steps):
    """The issue's reproduction: OUTPUT on a 64 kB file system. Without --save-steps the final model
    is refused (it was a safetensors traceback and a stale .final-tmp), with --save-steps 2 the first
    checkpoint (it was "unexpected pos" and a stale .tmp-step-*)."""
    disk = small_disk(64)
    out = disk.path / "run"
    with disk.limited_from_start():
        proc, log = launch([*sft_args(work), "--save-steps", save_steps, "--output", out], tmp_path / "run.log")
    rc, text = finished(proc, log)
    assert rc == 3, text[-4000:]
    line = stop_message(text, "sft")
    assert disk.full_words in line and "no checkpoint is complete yet" in line, line
    assert ("step-000000002" if save_steps else "the final model into") in line, line
    assert not temporaries(out) and not (out / "config.json").exists() and not (out / "summary.json").exists()
    assert read_metrics(out / "metrics.jsonl")  # what was logged stays readable


@pytest.mark.slow
def test_reference_cache_on_a_full_disk_stops_before_training(work, small_disk, tmp_path):
    disk = small_disk(64)
    if disk.tmpfs:
        disk.fill()
    else:
        pytest.skip("the cache entries are smaller than a file-size limit this process could live with")
    proc, log = launch([*STAGES["dpo"].args(work), "--ref-cache-dir", disk.path / "cache", "--output",
                        tmp_path / "run"], tmp_path / "run.log")
    rc, text = finished(proc, log)
    assert rc == 3, text[-4000:]
    line = stop_message(text, "dpo")
    assert f"writing {disk.path / 'cache'}" in line and "--ref-cache-dir" in line and disk.full_words in line
    assert not temporaries(disk.path)


@pytest.mark.slow
def test_a_write_no_helper_guards_is_still_one_clear_error(work, small_disk, capsys):
    """`prefalign score --output` writes its file itself: the CLI still reports the full disk plainly."""
    disk = small_disk()
    if not disk.tmpfs:
        pytest.skip("the scores file is smaller than a file-size limit this process could live with")
    disk.fill()
    args = ["score", "--reward-model", reward_model(work), "--data", work / "prefs.jsonl", "--output",
            disk.path / "scores.jsonl"]
    assert cli_main([str(a) for a in args]) == 3
    err = capsys.readouterr().err
    # Python's own file writes do not say which file failed: the message says so instead of guessing.
    assert "prefalign score: stopped: no space left on the device: writing a file failed. Free space there" in err
    assert "Traceback" not in err


# ----------------------------------------------------------------------------- torchrun: one worker SIGKILLed

def children(pid: int) -> list[int]:
    kids = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                fields = (p / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                kids.append(int(p.name))
    return kids


def worker_pid(launcher: int, rank: int) -> int:
    """The pid of torchrun's worker process of ``rank``."""
    for pid in children(launcher):
        with contextlib.suppress(OSError):
            if f"RANK={rank}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                return pid
    raise AssertionError(f"no worker of rank {rank} under torchrun (pid {launcher})")


def torchrun_cli(args, log_path: Path):
    log = open(log_path, "w+")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "prefalign",
           *map(str, args)]
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, text=True, env={**os.environ, **ENV}), log


# Per stage: options for 2 processes, and for the resume (None: resumed by 2 processes again, since a PPO
# checkpoint holds per-rank sampling streams and resumes only in as many processes).
TORCHRUN = {"sft": ([], ["--batch-size", 4]),  # a global batch of 8 either way (--grad-accum 2)
            "ppo": (["--rollout-batch-size", 2, "--minibatch-size", 1], None),
            "grpo": (["--rollout-batch-size", 1, "--minibatch-size", 1], None),  # the online methods too
            "online-dpo": (["--rollout-batch-size", 2, "--minibatch-size", 1], None)}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(TORCHRUN))
def test_sigkill_of_one_torchrun_worker_ends_the_run_and_resume_continues(work, tmp_path, monkeypatch, name):
    """One of 2 workers SIGKILLed once the checkpoint at step 2 is complete: torchrun ends the run within
    seconds (measured ~1 s on an idle machine), the checkpoints are whole, and --resume (1 process for
    sft, 2 for PPO and GRPO) continues from the newest one, logging every step exactly once."""
    monkeypatch.setenv("PREFALIGN_CACHE", str(work / "cache"))
    stage = stage_or_skip(name)
    two, one = TORCHRUN[name]
    out = tmp_path / "run"
    args = [*stage.args(work), *two, "--output", out]
    proc, log = torchrun_cli(args, tmp_path / "killed.log")
    wait_until(proc, log, checkpoint_done(out, KILL_AFTER))
    t0 = time.monotonic()
    os.kill(worker_pid(proc.pid, rank=1), signal.SIGKILL)
    rc = proc.wait(timeout=120)
    took = time.monotonic() - t0
    log.seek(0)
    assert rc != 0 and took < 15, (rc, took, log.read()[-3000:])
    print(f"torchrun ended {took:.2f}s after the SIGKILL")
    steps = complete_steps(out)
    assert steps and all(ckpt._check(out / ckpt.CKPT_DIR / s) is None for s in steps)
    assert not (out / "summary.json").exists()
    if one is not None:
        stderr = run_cli(*args, *one, "--resume", env=ENV).stderr
    else:
        proc, log = torchrun_cli([*args, "--resume"], tmp_path / "resumed.log")
        rc, stderr = finished(proc, log)
        assert rc == 0, stderr[-4000:]
    assert f"resumed from {out / ckpt.CKPT_DIR / steps[-1]}" in stderr
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == (1 if one is not None else 2) and summary["steps"] == 8
    assert [r["step"] for r in read_metrics(out / "metrics.jsonl")] == list(range(1, 9))


@pytest.mark.slow
def test_a_save_rank_zero_cannot_write_stops_every_rank_alike(tmp_path):
    """Under torchrun rank 0 alone writes checkpoints and the final model: when the disk refuses, every
    rank raises the same DiskError (exit 3) instead of waiting for rank 0 or training on. (The final
    "model" there is a torch.save to a path, whose failure says nothing of the cause: the probe finds it.)"""
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           str(Path(__file__).with_name("faults_dist_check.py")), str(tmp_path)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1] and set(ranks[0]) == {"checkpoint", "final"}
    assert "file too large" in ranks[0]["checkpoint"][0] and "step-000000002" in ranks[0]["checkpoint"][0]
    assert "step-000000001, which is intact" in ranks[0]["checkpoint"][0] and ranks[0]["checkpoint"][1] == 3
    assert "the final model into" in ranks[0]["final"][0]
    assert complete_steps(tmp_path / "run") == ["step-000000001"] and not temporaries(tmp_path / "run")
