"""Atomic checkpoints: a kill mid-save keeps the previous one; broken ones are skipped, never loaded half."""
import signal
import subprocess
import sys
import textwrap

import pytest
import torch

from prefalign.errors import ConfigError
from prefalign.tiny import SAMPLE_TEXTS, tiny_llama, tiny_tokenizer
from prefalign.train import checkpoint as ckpt
from prefalign.train.logger import MetricsLogger, read_metrics
from prefalign.train.loop import fit
from test_loop import CPU, TokenLM, collate, make_cfg


def state(step):
    return {"model": {"w": torch.full((64,), float(step))}, "optimizer": {}, "scheduler": {},
            "rng": ckpt.rng_state(), "position": {"step": step}}


def steps_on_disk(out):
    return sorted(p.name for p in (out / ckpt.CKPT_DIR).iterdir())


def loaded_step(out):
    found = ckpt.load_latest(out)
    return None if found is None else found[1]["position"]["step"]


class HalfWrite(Exception):
    pass


def half_then_fail(obj, f):
    """torch.save that dies halfway: some bytes reach the file, then the 'process' stops."""
    f.write(b"PK\x03\x04" + b"\0" * 500)
    raise HalfWrite()


def test_failed_save_keeps_previous_and_prunes_only_after_completion(tmp_path, monkeypatch):
    for step in (1, 2):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep=1)
    assert steps_on_disk(tmp_path) == ["step-000000002"]  # keep=1 pruned step 1 after step 2 completed
    monkeypatch.setattr(torch, "save", half_then_fail)
    with pytest.raises(HalfWrite):
        ckpt.save_checkpoint(tmp_path, 3, state(3), keep=1)
    monkeypatch.undo()
    # The half-written step 3 is a temporary folder; step 2 was not pruned and still loads.
    assert "step-000000002" in steps_on_disk(tmp_path)
    assert not any(n.startswith("step-000000003") for n in steps_on_disk(tmp_path))
    assert loaded_step(tmp_path) == 2
    assert torch.equal(ckpt.load_latest(tmp_path)[1]["model"]["w"], torch.full((64,), 2.0))
    ckpt.save_checkpoint(tmp_path, 4, state(4), keep=1)  # the next save cleans the leftover
    assert steps_on_disk(tmp_path) == ["step-000000004"]


def test_sigkill_during_save_keeps_previous(tmp_path):
    """A real process killed (SIGKILL) while torch.save is writing the second checkpoint."""
    script = textwrap.dedent(f"""
        import os, signal, torch
        from prefalign.train import checkpoint as ckpt
        state = lambda s: {{"model": {{"w": torch.full((64,), float(s))}}, "optimizer": {{}}, "scheduler": {{}},
                           "rng": ckpt.rng_state(), "position": {{"step": s}}}}
        ckpt.save_checkpoint({str(tmp_path)!r}, 1, state(1), keep=1)
        def dying_save(obj, f):
            f.write(b"PK" + b"\\0" * 4096); f.flush(); os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        torch.save = dying_save
        ckpt.save_checkpoint({str(tmp_path)!r}, 2, state(2), keep=1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    names = steps_on_disk(tmp_path)
    assert "step-000000001" in names and any(n.startswith(".tmp-step-000000002") for n in names)
    assert loaded_step(tmp_path) == 1


def test_truncated_or_unmarked_checkpoints_are_skipped(tmp_path, capsys):
    for step in (1, 2, 3, 4):
        ckpt.save_checkpoint(tmp_path, step, state(step), keep=0)
    root = tmp_path / ckpt.CKPT_DIR
    (root / "step-000000004" / ckpt.MARKER).unlink()  # killed before the marker
    data = (root / "step-000000003" / ckpt.STATE).read_bytes()
    (root / "step-000000003" / ckpt.STATE).write_bytes(data[:len(data) // 2])  # truncated
    # Truncated AND marker rewritten to match (size check fooled): torch.load must still reject it.
    (root / "step-000000002" / ckpt.STATE).write_bytes(data[:len(data) // 3])
    (root / "step-000000002" / ckpt.MARKER).write_text("2\n")
    assert loaded_step(tmp_path) == 1
    err = capsys.readouterr().err
    assert "step-000000004: no COMPLETE marker" in err
    assert "step-000000003: state.pt has" in err and "truncated" in err
    assert "step-000000002: state.pt cannot be read" in err


def test_no_usable_checkpoint_returns_none(tmp_path):
    assert ckpt.load_latest(tmp_path) is None
    ckpt.save_checkpoint(tmp_path, 1, state(1))
    (tmp_path / ckpt.CKPT_DIR / "step-000000001" / ckpt.MARKER).unlink()
    assert ckpt.load_latest(tmp_path) is None


def test_torn_metrics_line_is_dropped_on_resume(tmp_path):
    log = MetricsLogger(tmp_path)
    for step in (1, 2, 3):
        log.log({"step": step, "loss": 1.0 / step})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    log.truncate_after(2)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]


@pytest.fixture(scope="module")
def lm():
    tok = tiny_tokenizer(SAMPLE_TEXTS, vocab_size=300)
    return tok, [tok(t)["input_ids"] for t in SAMPLE_TEXTS[:6] * 4]


def test_resume_with_another_model_or_data_is_a_clear_error(lm, tmp_path):
    tok, data = lm
    fit(make_cfg(tmp_path, max_steps=2, save_steps=1), tiny_llama(tok), TokenLM(), data, collate,
        out_dir=tmp_path, dist=CPU)
    with pytest.raises(ConfigError, match="does not match this run's model"):
        fit(make_cfg(tmp_path, max_steps=3, resume=True), tiny_llama(tok, hidden=48), TokenLM(), data, collate,
            out_dir=tmp_path, dist=CPU)
    with pytest.raises(ConfigError, match="written with 24 training examples.*this run has 16"):
        fit(make_cfg(tmp_path, max_steps=3, resume=True), tiny_llama(tok), TokenLM(), data[:16], collate,
            out_dir=tmp_path, dist=CPU)


def test_resume_without_checkpoint_starts_over_and_drops_old_rows(lm, tmp_path, capsys):
    tok, data = lm
    fit(make_cfg(tmp_path, max_steps=2), tiny_llama(tok), TokenLM(), data, collate, out_dir=tmp_path, dist=CPU)
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2]
    fit(make_cfg(tmp_path, max_steps=3, resume=True), tiny_llama(tok), TokenLM(), data, collate,
        out_dir=tmp_path, dist=CPU)
    assert "no complete checkpoint" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1, 2, 3]


def test_last_step_is_checkpointed_and_resume_after_the_end_keeps_metrics(lm, tmp_path):
    tok, data = lm
    first = fit(make_cfg(tmp_path, max_steps=3, save_steps=2, keep_checkpoints=0), tiny_llama(tok), TokenLM(),
                data, collate, out_dir=tmp_path, dist=CPU)
    assert steps_on_disk(tmp_path) == ["step-000000002", "step-000000003"]
    again = fit(make_cfg(tmp_path, max_steps=3, save_steps=2, resume=True), tiny_llama(tok), TokenLM(), data,
                collate, out_dir=tmp_path, dist=CPU)
    assert again.steps == 3 and again.resumed_from == 3 and again.last_metrics == first.last_metrics


def test_new_lr_on_resume_takes_effect(lm, tmp_path):
    """The bad-steps message says: lower --lr, then --resume. The new LR must really apply."""
    tok, data = lm
    fit(make_cfg(tmp_path, max_steps=2, save_steps=2, lr_schedule="constant"), tiny_llama(tok), TokenLM(), data,
        collate, out_dir=tmp_path, dist=CPU)
    fit(make_cfg(tmp_path, max_steps=4, resume=True, lr=1e-4, lr_schedule="constant"), tiny_llama(tok), TokenLM(),
        data, collate, out_dir=tmp_path, dist=CPU)
    assert [r["lr"] for r in read_metrics(tmp_path / "metrics.jsonl")] == [1e-3, 1e-3, 1e-4, 1e-4]


def test_rng_states_round_trip():
    import random

    import numpy as np

    saved = ckpt.rng_state(torch.device("cpu"))
    draws = (random.random(), float(np.random.rand()), torch.rand(3))
    random.random(), np.random.rand(), torch.rand(7)  # move every stream on
    ckpt.set_rng_state(saved, torch.device("cpu"))
    again = (random.random(), float(np.random.rand()), torch.rand(3))
    assert draws[:2] == again[:2] and torch.equal(draws[2], again[2])


def test_a_checkpoint_of_an_earlier_prefalign_is_refused_clearly(lm, tmp_path):
    """Checkpoints from before the run harness (no "format" key, other plan and stream keys) are
    refused with a message, never a KeyError or a misleading plan mismatch."""
    tok, data = lm
    fit(make_cfg(tmp_path, max_steps=2, save_steps=1), tiny_llama(tok), TokenLM(), data, collate,
        out_dir=tmp_path, dist=CPU)
    path, state = ckpt.load_latest(tmp_path)
    state.pop("format")
    state.pop("generators")
    state["plan"] = {"examples": 24, "global_batch": 8}
    ckpt.save_checkpoint(tmp_path, 2, state)
    with pytest.raises(ConfigError, match="written by an earlier prefalign"):
        fit(make_cfg(tmp_path, max_steps=3, resume=True), tiny_llama(tok), TokenLM(), data, collate,
            out_dir=tmp_path, dist=CPU)
