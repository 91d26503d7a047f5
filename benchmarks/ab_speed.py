"""No slower than before: `prefalign dpo --packing` and `prefalign ppo` at a reference revision and at
the working tree, side by side in one invocation, alternating which goes first.

    python benchmarks/ab_speed.py                 # against e160771 (before the run harness)
    python benchmarks/ab_speed.py --ref REV --rounds 3 --threads 1

The same command lines as benchmarks/dpo_speed.py (DPO: 20 steps after 3 warm-up, batch 8, max
length 256, reference precomputed) and benchmarks/ppo_bench.py (PPO: 8 iterations of 8 prompts,
24 new tokens, 4 epochs) on one make_fixture.py fixture; the reference revision's src/ comes from
`git archive` and runs with PYTHONPATH pointing at it. Prints seconds per DPO step and per PPO
iteration for both, and the ratio reference / working tree (above 1: the working tree is faster).
Both get the same OMP_NUM_THREADS; on a loaded machine compare the ratio, not the seconds.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FIXTURE_BUILDER = ROOT.parent / "shared" / "bench" / "make_fixture.py"


def run(src: Path, args: list[str], threads: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(src), "OMP_NUM_THREADS": str(threads), "HF_HUB_OFFLINE": "1"}
    p = subprocess.run([sys.executable, "-m", "prefalign", *args], env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"failed ({src}): prefalign {' '.join(args)}\n{p.stderr[-3000:]}")


def dpo_s_per_step(src: Path, fx: Path, out: Path, threads: int, warmup: int = 3, steps: int = 20) -> float:
    run(src, ["dpo", "--model", str(fx / "model"), "--data", str(fx / "pairs.jsonl"), "--output", str(out),
              "--batch-size", "8", "--max-length", "256", "--max-steps", str(steps + warmup), "--logging-steps", "1",
              "--ref-cache-dir", str(out / "cache"), "--no-progress", "--dtype", "float32", "--packing"], threads)
    rows = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    return sum(1 / r["perf/steps_per_s"] for r in rows if r["step"] > warmup) / steps


def ppo_s_per_iter(src: Path, fx: Path, out: Path, threads: int, iterations: int = 8) -> float:
    run(src, ["ppo", "--model", str(fx / "model"), "--reward-model", str(fx / "model"), "--prompts",
              str(fx / "pairs.jsonl"), "--output", str(out), "--iterations", str(iterations), "--rollout-batch-size",
              "8", "--minibatch-size", "8", "--ppo-epochs", "4", "--max-new-tokens", "24", "--temperature", "0.7",
              "--kl-coef", "0.05", "--lr", "1e-5", "--sample-every", "0", "--device", "cpu", "--dtype", "float32",
              "--no-progress"], threads)
    return json.loads((out / "summary.json").read_text())["iterations_time_s"] / iterations


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ref", default="e160771", help="git revision to compare the working tree against")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="ab-speed-"))
    ref_root = work / "ref"
    ref_root.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", args.ref, "src"], check=True, capture_output=True)
    subprocess.run(["tar", "-x", "-C", str(ref_root)], input=archive.stdout, check=True)
    subprocess.run([sys.executable, str(FIXTURE_BUILDER), str(work / "fx")], check=True, capture_output=True)
    sources = {args.ref: ref_root / "src", "working tree": ROOT / "src"}
    times: dict[str, dict[str, list[float]]] = {k: {"dpo": [], "ppo": []} for k in sources}
    for r in range(args.rounds):
        order = list(sources) if r % 2 == 0 else list(sources)[::-1]
        for name in order:
            out = work / f"out-{r}-{name.replace(' ', '-')}"
            times[name]["dpo"].append(dpo_s_per_step(sources[name], work / "fx", out / "dpo", args.threads))
            times[name]["ppo"].append(ppo_s_per_iter(sources[name], work / "fx", out / "ppo", args.threads))
            print(f"round {r + 1} {name:>12}: dpo {times[name]['dpo'][-1]:.3f} s/step, "
                  f"ppo {times[name]['ppo'][-1]:.3f} s/iter", flush=True)
    for stage in ("dpo", "ppo"):
        ref, now = (statistics.median(times[k][stage]) for k in sources)
        print(f"{stage}: median {ref:.3f} s ({args.ref}) vs {now:.3f} s (working tree): "
              f"{ref / now:.2f}x the reference's speed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
