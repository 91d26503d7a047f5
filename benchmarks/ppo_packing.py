"""`prefalign ppo --packing` vs padded forwards, alternating runs on the same fixture.

Prompts of ragged length: each fixture prompt extended by a seeded random number (3-60 words in
all) of words from its own pair, so a padded batch pays for its longest prompt. Everything else as
in ppo_bench.py except 48 new tokens. With --fixture-prompts the fixture's own 2-5-token prompts
are used (almost no padding to remove).

usage: python benchmarks/ppo_packing.py [--fixture DIR] [--rounds N] [--threads T] [--fixture-prompts]
Prints s/iter and the rollout / score / update split of every run.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def ragged_prompts(pairs: Path, out: Path, seed: int = 0) -> Path:
    rng = random.Random(seed)
    rows = [json.loads(line) for line in pairs.read_text().splitlines() if line.strip()]
    with out.open("w") as f:
        for r in rows:
            words = (r["prompt"] + r["chosen"] + " " + r["rejected"]).split()
            f.write(json.dumps({"prompt": " ".join(words[:rng.randint(3, 60)])}) + "\n")
    return out


def run(fixture: Path, prompts: Path, new_tokens: int, packing: bool) -> dict:
    out = Path(tempfile.mkdtemp(prefix="ppo-packing-")) / "out"
    iterations = 8
    cmd = [sys.executable, "-m", "prefalign", "ppo", "--model", str(fixture / "model"), "--reward-model",
           str(fixture / "model"), "--prompts", str(prompts), "--output", str(out), "--iterations", str(iterations),
           "--rollout-batch-size", "8", "--minibatch-size", "8", "--ppo-epochs", "4", "--max-new-tokens",
           str(new_tokens), "--temperature", "0.7", "--kl-coef", "0.05", "--lr", "1e-5", "--sample-every", "0",
           "--device", "cpu", "--dtype", "float32", "--no-progress"] + ["--packing"] * packing
    subprocess.run(cmd, check=True, capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT / "src")})
    summary = json.loads((out / "summary.json").read_text())
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    parts = {k: sum(r[f"perf/time_{k}_s"] for r in rows) / len(rows) for k in ("rollout", "score", "update")}
    return {"s_per_iter": summary["iterations_time_s"] / iterations, **parts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--fixture", default=str(ROOT / ".bench" / "fixture"), help="fixture directory (make_fixture.py)")
    ap.add_argument("--rounds", type=int, default=2, help="alternating rounds (padded then packed, then reversed)")
    ap.add_argument("--threads", type=int, default=1, help="OMP/torch threads")
    ap.add_argument("--fixture-prompts", action="store_true", help="the fixture's own short prompts, 24 new tokens")
    a = ap.parse_args()
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(a.threads)
    fixture = Path(a.fixture)
    if a.fixture_prompts:
        prompts, new_tokens = fixture / "pairs.jsonl", 24
    else:
        prompts, new_tokens = ragged_prompts(fixture / "pairs.jsonl", Path(tempfile.mkdtemp()) / "prompts.jsonl"), 48
    best = {}
    for r in range(a.rounds):
        for packing in ([False, True] if r % 2 == 0 else [True, False]):
            res = run(fixture, prompts, new_tokens, packing)
            name = "packed" if packing else "padded"
            best[name] = min(best.get(name, res["s_per_iter"]), res["s_per_iter"])
            print(f"round {r + 1} {name}: " + " ".join(f"{k}={v:.3f}" for k, v in res.items()), flush=True)
    print(f"best of {a.rounds}: padded {best['padded']:.3f} s/iter, packed {best['packed']:.3f} s/iter -> "
          f"{best['padded'] / best['packed']:.2f}x")


if __name__ == "__main__":
    main()
