"""Greedy completions of a few held-out HH prompts, to compare a model before and after training.

    python examples/hh_generate.py --model models/smollm2-135m-instruct --data /tmp/hh/hh-harmless-heldout.jsonl \
        --output /tmp/hh/before.jsonl

Picks the first --n pairs of --data whose prompt is at most --short tokens (short prompts read well in
a doc), encodes each prompt exactly as training does (raw HH text, start cut to --max-prompt-length),
and decodes greedily (top-k 1) up to --max-new-tokens. The reply is cut at the next "Human:" turn,
which a base model trained on raw dialogue text tends to write next. Writes JSONL {id, prompt, completion}.
"""
from __future__ import annotations

import argparse
import json
import sys

import torch

from prefalign.data import encode_prompt, load_preferences
from prefalign.models import load_causal_lm
from prefalign.rollout import sample


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--output", required=True)
    ap.add_argument("--n", type=int, default=4)
    ap.add_argument("--short", type=int, default=64, help="only prompts of at most this many tokens")
    ap.add_argument("--max-prompt-length", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=48)
    args = ap.parse_args(argv)

    model, tok = load_causal_lm(args.model, device="cpu")
    model.eval()
    chosen = []
    for ex in load_preferences(args.data):
        ids = encode_prompt(tok, ex.prompt, args.max_prompt_length)
        if len(ids) <= args.short:
            chosen.append((ex, ids))
        if len(chosen) == args.n:
            break
    out = sample(model, [ids for _, ids in chosen], max_new_tokens=args.max_new_tokens,
                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, top_k=1)  # top-k 1: greedy
    with open(args.output, "w", encoding="utf-8") as f:
        for (ex, _), ids, mask in zip(chosen, out.response_ids, out.response_mask):
            text = tok.decode(ids[mask].tolist(), skip_special_tokens=True).split("Human:")[0].rstrip()
            row = {"source": ex.source, "prompt": ex.prompt, "completion": text}
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
            print(json.dumps(row, ensure_ascii=False), flush=True)
    return 0


if __name__ == "__main__":
    torch.manual_seed(0)
    sys.exit(main())
