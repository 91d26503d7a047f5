"""PPO speed, side by side: prefalign ppo vs trl 1.9.2's PPOTrainer (its own env), alternating runs.

Same fixture (shared/bench/make_fixture.py), same settings as shared/bench/trl_ppo.py: 64 episodes =
8 iterations of 8 prompts, response length 24, 4 PPO epochs of one minibatch of 8, kl_coef 0.05,
lr 1e-5, temperature 0.7, CPU fp32; reward and value models are the fixture backbone with a fresh
scalar head. Scores of random models mean nothing, so only speed and peak memory are compared.

usage: python benchmarks/ppo_bench.py [--fixture DIR] [--rounds N] [--trl-python PATH]
Prints one line per run and a summary; each run is its own process, its peak RSS measured by a
wrapper process (ru_maxrss of its only child).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import find_bench_dir  # noqa: E402

BENCH = find_bench_dir()  # ../shared/bench, also from a git worktree
EPISODES, BATCH, RESPONSE_LENGTH = 64, 8, 24
WRAPPER = ("import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
           "print('MAXRSS_KB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); "
           "sys.exit(p.returncode)")


def measured(cmd: list[str], env=None) -> tuple[str, float]:
    """Run cmd under the RSS wrapper: (stdout + stderr, peak RSS in MiB)."""
    p = subprocess.run([sys.executable, "-c", WRAPPER, *cmd], capture_output=True, text=True,
                       env={**os.environ, **(env or {})})
    text = p.stdout + p.stderr
    if p.returncode != 0:
        raise SystemExit(f"failed: {' '.join(cmd)}\n{text[-3000:]}")
    return text, int(re.search(r"MAXRSS_KB (\d+)", text).group(1)) / 1024


def run_trl(python: str, fixture: Path, episodes: int = EPISODES, batch: int = BATCH) -> dict:
    text, rss = measured([python, str(BENCH / "trl_ppo.py"), str(fixture), "--episodes", str(episodes),
                          "--batch", str(batch), "--response-length", str(RESPONSE_LENGTH)])
    s_per_iter = float(re.search(r"s_per_iter=([\d.]+)", text).group(1))
    return {"s_per_iter": s_per_iter, "rss_mib": rss}


def run_prefalign(fixture: Path, packing: bool, episodes: int = EPISODES, batch: int = BATCH,
                  extra: tuple = ()) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ppo-bench-")) / "out"
    iterations = episodes // batch
    _, rss = measured([sys.executable, "-m", "prefalign", "ppo", "--model", str(fixture / "model"),
                       "--reward-model", str(fixture / "model"), "--prompts", str(fixture / "pairs.jsonl"),
                       "--output", str(out), "--iterations", str(iterations), "--rollout-batch-size", str(batch),
                       "--minibatch-size", str(batch), "--ppo-epochs", "4", "--max-new-tokens", str(RESPONSE_LENGTH),
                       "--temperature", "0.7", "--kl-coef", "0.05", "--lr", "1e-5", "--sample-every", "0",
                       "--device", "cpu", "--dtype", "float32", "--no-progress", *extra] + ["--packing"] * packing,
                      env={"PYTHONPATH": str(ROOT / "src")})
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    parts = {k: sum(r[f"perf/time_{k}_s"] for r in rows) / len(rows) for k in ("rollout", "score", "update")}
    return {"s_per_iter": summary["iterations_time_s"] / iterations, "rss_mib": rss, **parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default=None, help="fixture directory (default: build one in a temp dir)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (trl then prefalign, then reversed)")
    ap.add_argument("--trl-python", default=str(ROOT / ".bench" / "trl-ppo" / "bin" / "python"))
    ap.add_argument("--threads", type=int, default=1,
                    help="OMP/torch threads for both sides (1: robust on a machine shared with other jobs)")
    ap.add_argument("--packing", action="store_true", help="prefalign ppo --packing (forwards on packed rows)")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    fixture = Path(a.fixture) if a.fixture else Path(tempfile.mkdtemp(prefix="ppo-fixture-"))
    if not (fixture / "model").exists():
        subprocess.run([sys.executable, str(BENCH / "make_fixture.py"), str(fixture)], check=True)
    runs: dict[str, list[dict]] = {"trl": [], "prefalign": []}
    for r in range(a.rounds):
        order = ["trl", "prefalign"] if r % 2 == 0 else ["prefalign", "trl"]
        for name in order:
            res = run_trl(a.trl_python, fixture) if name == "trl" else run_prefalign(fixture, a.packing)
            runs[name].append(res)
            print(f"round {r + 1} {name}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    best = {k: min(v, key=lambda x: x["s_per_iter"]) for k, v in runs.items()}
    speedup = best["trl"]["s_per_iter"] / best["prefalign"]["s_per_iter"]
    print(f"best of {a.rounds}: trl {best['trl']['s_per_iter']:.3f} s/iter, prefalign "
          f"{best['prefalign']['s_per_iter']:.3f} s/iter -> {speedup:.2f}x iterations/s; peak RSS trl "
          f"{max(x['rss_mib'] for x in runs['trl']):.0f} MiB, prefalign "
          f"{max(x['rss_mib'] for x in runs['prefalign']):.0f} MiB")


if __name__ == "__main__":
    main()
