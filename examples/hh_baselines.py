"""Trivial baselines for pairwise accuracy on a preference file: always pick the longer (or shorter) answer.

    python examples/hh_baselines.py --data /tmp/hh/hh-harmless-heldout.jsonl [--model models/smollm2-135m-instruct]

Lengths are of the completions only (what follows the shared prompt), in characters, and in tokens
with --model. A tie (equal lengths) counts as wrong for both rules, as `prefalign score` counts a tied
score; the tie count is printed so you can also count ties as half. Prints JSON.
"""
from __future__ import annotations

import argparse
import json
import sys

from prefalign.data import load_preferences


def length_accuracy(chosen_lengths: list[int], rejected_lengths: list[int]) -> dict:
    n = len(chosen_lengths)
    longer = sum(c > r for c, r in zip(chosen_lengths, rejected_lengths))
    shorter = sum(c < r for c, r in zip(chosen_lengths, rejected_lengths))
    return {"pairs": n, "pick_longer": longer / n, "pick_shorter": shorter / n, "ties": n - longer - shorter}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--data-format", default=None)
    ap.add_argument("--model", default=None, help="tokenizer for token lengths (optional)")
    args = ap.parse_args(argv)

    pairs = load_preferences(args.data, args.data_format)
    report = {"data": args.data,
              "characters": length_accuracy([len(p.chosen) for p in pairs], [len(p.rejected) for p in pairs])}
    if args.model:
        from prefalign.models import load_tokenizer
        tok = load_tokenizer(args.model)
        n_tokens = lambda text: len(tok(text, add_special_tokens=False)["input_ids"])  # noqa: E731
        report["tokens"] = length_accuracy([n_tokens(p.chosen) for p in pairs], [n_tokens(p.rejected) for p in pairs])
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
