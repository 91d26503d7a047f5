"""Numerical agreement of prefalign dpo with TRL's DPOTrainer on the shared fixture.

usage: python benchmarks/dpo_agreement.py [WORKDIR] [--trl-python PY] [--ours-python PY] [--pairs 8]
       [--hidden 256] [--layers 4]

Builds the fixture (make_fixture.py), a reference that differs from the policy (the policy plus
seeded noise, same tokenizer), keeps the first 8 pairs so that one batch of 8 is the same set of
pairs for both (the first-step loss is a mean over the batch, so the order TRL's sampler draws
them in cannot matter), then runs one step of each:

  TRL:       trl_dpo.py FX --ref REF --steps 1 --log-every 1 --batch 8   (in .bench/trl)
  prefalign: prefalign dpo --model FX/model --data FX/pairs.jsonl --ref-model REF --batch-size 8
             --max-steps 1 --logging-steps 1 --beta 0.1 --max-length 256  (in .venv)

and compares the logged first-step loss and rewards/margins (relative difference, target < 1e-4).
Both tokenise the fixture the same way: text prompt + completion, the prompt's ids a prefix of
the joint ids, EOS appended once, no BOS (the fixture's tokenizer adds none), no truncation at 256.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_common import (default_python, find_bench_dir, json_lines, make_fixture, make_reference,  # noqa: E402
                          run_with_rss, subset_fixture)


def run_trl(python: str, fx: Path, ref: Path) -> dict:
    out = run_with_rss([python, str(find_bench_dir() / "trl_dpo.py"), str(fx), "--ref", str(ref),
                                 "--steps", "1", "--log-every", "1", "--batch", "8", "--max-length", "256"])["stdout"]
    rows = [r for r in json_lines(out) if r.get("step") == 1]
    if not rows:
        raise RuntimeError(f"trl_dpo.py printed no step-1 row:\n{out[-2000:]}")
    return rows[0]


def run_ours(python: str, fx: Path, ref: Path, work: Path) -> dict:
    out_dir = work / "prefalign-out"
    if out_dir.exists():
        import shutil
        shutil.rmtree(out_dir)
    run_with_rss([python, "-m", "prefalign", "dpo", "--model", str(fx / "model"), "--data", str(fx / "pairs.jsonl"),
                  "--ref-model", str(ref), "--output", str(out_dir), "--batch-size", "8", "--max-steps", "1",
                  "--logging-steps", "1", "--beta", "0.1", "--max-length", "256", "--dtype", "float32",
                  "--ref-cache-dir", str(work / "ref-cache"), "--no-progress"])
    return json.loads((out_dir / "metrics.jsonl").read_text().splitlines()[0])


def compare(work: Path, trl_python: str | None = None, ours_python: str | None = None, pairs: int = 8,
            **fixture) -> dict:
    work = Path(work)
    ours_python = ours_python or default_python("ours")
    trl_python = trl_python or default_python("trl")
    fx = make_fixture(work / "fixture", ours_python, **fixture)
    ref = make_reference(fx / "model", work / "reference", ours_python)
    sub = subset_fixture(fx, work / f"fixture-{pairs}", pairs)
    theirs, ours = run_trl(trl_python, sub, ref), run_ours(ours_python, sub, ref, work)
    rel = lambda a, b: abs(a - b) / max(abs(b), 1e-12)
    return {"trl_loss": theirs["loss"], "prefalign_loss": ours["loss"], "loss_rel": rel(ours["loss"], theirs["loss"]),
            "trl_margins": theirs["rewards/margins"], "prefalign_margins": ours["rewards/margins"],
            "margins_rel": rel(ours["rewards/margins"], theirs["rewards/margins"]), "pairs": pairs}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("work", nargs="?", default="/tmp/prefalign-dpo-agreement")
    ap.add_argument("--trl-python", default=None)
    ap.add_argument("--ours-python", default=None)
    ap.add_argument("--pairs", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    a = ap.parse_args()
    result = compare(Path(a.work), a.trl_python, a.ours_python, a.pairs, hidden=a.hidden, layers=a.layers)
    print(json.dumps(result, indent=1))
    ok = result["loss_rel"] < 1e-4 and result["margins_rel"] < 1e-4
    print("agreement:", "OK (both < 1e-4 relative)" if ok else "MISMATCH")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
