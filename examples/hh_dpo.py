"""DPO from SmolLM2-135M-Instruct on HH-RLHF harmless-base: train, held-out implicit-reward accuracy and
margins, and greedy completions of the same held-out prompts before and after.

Every step is the public CLI or a small example script:

    1. examples/hh_split.py        2,000 train / 312 held-out pairs (seeded), written under --work
    2. examples/hh_generate.py     greedy completions of a few held-out prompts by the base model
    3. prefalign dpo               LoRA adapters; the reference is the base (adapters off), scored live
                                   per batch (--live-reference), so no pass over all 2,000 pairs first;
                                   --eval-data = the held-out pairs (or their first --eval-pairs)
    4. examples/hh_generate.py     the same prompts, by the trained policy

The defaults are the CPU-sized run recorded in docs/real-model.md. At full scale (a GPU), e.g.:

    python examples/hh_dpo.py --work /tmp/hh --max-steps -1 --epochs 1 --eval-pairs 0 --batch-size 16 --lr 5e-6

Re-running continues a stopped training run (--resume) and skips finished steps. Extra options
after `--` go to `prefalign dpo` unchanged (e.g. `-- --beta 0.2 --loss ipo`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from hh_reward import HERE, ROOT, run


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", required=True, help="data and runs go here (outside the repository)")
    ap.add_argument("--model", default=str(ROOT / "models" / "smollm2-135m-instruct"), help="base model (make real-model)")
    ap.add_argument("--max-length", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=4, help="pairs per optimizer step")
    ap.add_argument("--max-steps", type=int, default=8)
    ap.add_argument("--epochs", type=float, default=1.0)
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--beta", type=float, default=0.1)
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--save-steps", type=int, default=2)
    ap.add_argument("--eval-pairs", type=int, default=32, help="evaluate on the first N held-out pairs (0: all 312)")
    ap.add_argument("--samples", type=int, default=4, help="held-out prompts completed before and after")
    ap.add_argument("extra", nargs="*", help="after --: more `prefalign dpo` options")
    args = ap.parse_args(argv)

    py, work = sys.executable, Path(args.work)
    train, heldout = work / "hh-harmless-train.jsonl", work / "hh-harmless-heldout.jsonl"
    if not heldout.exists():
        run(py, str(HERE / "hh_split.py"), "--out", str(work))
    eval_data = heldout
    if args.eval_pairs:
        eval_data = work / f"hh-harmless-heldout-first{args.eval_pairs}.jsonl"
        lines = heldout.read_text(encoding="utf-8").splitlines(keepends=True)[:args.eval_pairs]
        eval_data.write_text("".join(lines), encoding="utf-8")

    generate = [py, str(HERE / "hh_generate.py"), "--data", str(heldout), "--n", str(args.samples)]
    if not (work / "dpo-before.jsonl").exists():
        run(*generate, "--model", args.model, "--output", str(work / "dpo-before.jsonl"))

    out = work / "dpo"
    if not (out / "summary.json").exists():
        run(py, "-m", "prefalign", "dpo", "--model", args.model, "--data", str(train), "--eval-data", str(eval_data),
            "--output", str(out), "--lora", "--lora-r", str(args.lora_r), "--live-reference",
            "--max-length", str(args.max_length), "--batch-size", str(args.batch_size), "--beta", str(args.beta),
            "--max-steps", str(args.max_steps), "--epochs", str(args.epochs), "--lr", str(args.lr),
            "--lr-schedule", "constant", "--save-steps", str(args.save_steps), "--logging-steps", "1",
            "--resume", "--no-progress", *args.extra)
    run(*generate, "--model", str(out), "--output", str(work / "dpo-after.jsonl"))
    summary = json.loads((out / "summary.json").read_text())
    print(json.dumps({"steps": summary["steps"], "eval_pairs": args.eval_pairs or 312,
                      **summary["eval_metrics"]}, indent=2))
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
