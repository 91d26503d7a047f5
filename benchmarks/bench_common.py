"""Shared helpers of the DPO benchmarks: where the peer scripts and environments live, fixtures,
a reference that differs from the policy, and running a command while measuring its peak RSS."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def find_bench_dir() -> Path:
    """The shared peer scripts (make_fixture.py, trl_dpo.py): $PREFALIGN_BENCH_DIR, else ../shared/bench
    next to the checkout (or next to its parent, for git worktrees)."""
    env = os.environ.get("PREFALIGN_BENCH_DIR")
    candidates = [Path(env)] if env else [ROOT.parent / "shared" / "bench", ROOT.parent.parent / "shared" / "bench"]
    for c in candidates:
        if (c / "trl_dpo.py").is_file():
            return c
    sys.exit(f"peer scripts not found in {', '.join(map(str, candidates))}; set PREFALIGN_BENCH_DIR.")


def default_python(kind: str) -> str:
    """kind 'ours': .venv/bin/python of this checkout (else this interpreter); 'trl': .bench/trl/bin/python
    (built by benchmarks/setup_peers.sh); $PREFALIGN_TRL_PYTHON overrides the latter."""
    if kind == "trl":
        return os.environ.get("PREFALIGN_TRL_PYTHON") or str(ROOT / ".bench" / "trl" / "bin" / "python")
    venv = ROOT / ".venv" / "bin" / "python"
    return str(venv) if venv.exists() else sys.executable


def env_for(threads: int | None = None) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_DATASETS_OFFLINE": "1"}
    if threads:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def run_with_rss(cmd: list[str], env: dict | None = None) -> dict:
    """Run cmd and measure it. Returns {"lines": [(seconds since start, stdout line)], "stdout",
    "stderr", "wall_s", "rss_mib", "cpu_s"}: the peak resident memory of that child process alone (os.wait4
    gives one child's rusage; RUSAGE_CHILDREN would mix all the runs of this script)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env or env_for())
    lines, err = [], []
    pumps = [threading.Thread(target=lambda: [lines.append((time.perf_counter() - t0, l)) for l in proc.stdout]),
             threading.Thread(target=lambda: [err.append(l) for l in proc.stderr])]
    for th in pumps:
        th.start()
    _, status, usage = os.wait4(proc.pid, 0)
    for th in pumps:
        th.join()
    wall = time.perf_counter() - t0
    code = os.waitstatus_to_exitcode(status)
    proc.returncode = code
    out = "".join(l for _, l in lines)
    if code != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {code}\n{out[-3000:]}\n{''.join(err)[-3000:]}")
    return {"lines": lines, "stdout": out, "stderr": "".join(err), "wall_s": wall,
            "rss_mib": usage.ru_maxrss / 1024,  # Linux: ru_maxrss in KiB
            "cpu_s": usage.ru_utime + usage.ru_stime}  # that child's user + system CPU seconds


def make_fixture(out: Path, python: str, **kw) -> Path:
    """make_fixture.py OUT with --pairs/--hidden/--layers/--seed from kw; reused when present."""
    if not (out / "model" / "config.json").exists():
        args = [f"--{k}={v}" for k, v in kw.items()]
        subprocess.run([python, str(find_bench_dir() / "make_fixture.py"), str(out), *args], check=True,
                       env=env_for(), capture_output=True)
    return out


PERTURB = """
import sys, torch
from transformers import AutoModelForCausalLM, AutoTokenizer
src, dst, scale = sys.argv[1], sys.argv[2], float(sys.argv[3])
m = AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32)
g = torch.Generator().manual_seed(1234)
with torch.no_grad():
    for p in m.parameters():
        p.add_(scale * p.abs().mean() * torch.randn(p.shape, generator=g))
m.save_pretrained(dst)
AutoTokenizer.from_pretrained(src).save_pretrained(dst)
"""


def make_reference(model_dir: Path, out: Path, python: str, scale: float = 0.5) -> Path:
    """A reference that differs from the policy but shares its tokenizer: the policy's weights plus
    seeded noise (scale x each tensor's mean |w|). (A fixture made with another --seed would bring
    another tokenizer, so its token ids would mean other words.)"""
    if not (out / "config.json").exists():
        subprocess.run([python, "-c", PERTURB, str(model_dir), str(out), str(scale)], check=True, env=env_for(),
                       capture_output=True)
    return out


def subset_fixture(fx: Path, out: Path, n_pairs: int) -> Path:
    """A fixture directory with the first n pairs of fx and a link to its model."""
    out.mkdir(parents=True, exist_ok=True)
    lines = (fx / "pairs.jsonl").read_text().splitlines()[:n_pairs]
    (out / "pairs.jsonl").write_text("\n".join(lines) + "\n")
    if not (out / "model").exists():
        (out / "model").symlink_to((fx / "model").resolve())
    return out


def json_lines(text: str) -> list[dict]:
    rows = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("{"):
            try:
                rows.append(json.loads(line))
            except ValueError:
                pass
    return rows
