"""Inverse-CDF token draws (rollout.draw_tokens, since dae2dd8) against torch.multinomial: speed and distribution.

On a finished `prefalign demo` folder, with its SFT model and held-out prompts, on this CPU:

  speed         seconds of one `rollout.sample` call on --batch held-out prompts (median of --timing-reps), and
                of one `rollout.sample_groups` call (16 prompts x 8 completions), for each draw
  distribution  --reps passes of `rollout.sample` over every held-out prompt with each draw: mean summed
                log-prob, completion length, EOS share and gold reward of the completions, each with its
                standard error over samples; the two draws should agree within them

torch.multinomial is put back for the comparison by replacing prefalign.rollout.draw_tokens (the one place
a token is drawn) with a function that ignores the uniforms and calls torch.multinomial on the same generators.

    python benchmarks/sampler_check.py --demo DIR [--reps 10] [--json out.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch

import prefalign.rollout as rollout
from prefalign.lab.demo_data import read_jsonl
from prefalign.lab.evaluate import prompt_ids
from prefalign.lab.gold import gold_rewards
from prefalign.models import load_causal_lm

DRAWS = ("multinomial", "inverse-cdf")


def multinomial(generators: list[torch.Generator]):
    """A draw as before dae2dd8: torch.multinomial, the rows split evenly among ``generators`` in order
    (one per group in sample_groups, a call per group); the uniforms rollout passes are ignored."""
    def draw(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
        rows = probs.chunk(len(generators))
        return torch.cat([torch.multinomial(p, 1, generator=g).squeeze(-1) for p, g in zip(rows, generators)])
    return draw


@contextmanager
def draw_with(kind: str, generators: list[torch.Generator]):
    """rollout's token draw is ``kind`` inside the block."""
    inverse_cdf = rollout.draw_tokens
    if kind == "multinomial":
        rollout.draw_tokens = multinomial(generators)
    try:
        yield
    finally:
        rollout.draw_tokens = inverse_cdf


def sample_once(model, tok, ids, kind: str, seed: int, max_new_tokens: int) -> rollout.Rollout:
    g = torch.Generator().manual_seed(seed)
    with draw_with(kind, [g]):
        return rollout.sample(model, ids, max_new_tokens=max_new_tokens, eos_token_id=tok.eos_token_id,
                              pad_token_id=tok.pad_token_id, generator=g)


def timing(model, tok, ids, kind: str, reps: int, max_new_tokens: int) -> dict:
    single, groups = [], []
    for rep in range(reps):
        t = time.perf_counter()
        sample_once(model, tok, ids, kind, rep, max_new_tokens)
        single.append(time.perf_counter() - t)
        gens = [torch.Generator().manual_seed(1000 * rep + p) for p in range(16)]
        t = time.perf_counter()
        with draw_with(kind, gens):
            rollout.sample_groups(model, ids[:16], 8, gens, max_new_tokens=max_new_tokens,
                                  eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
        groups.append(time.perf_counter() - t)
    return {"sample_s": statistics.median(single), "sample_groups_16x8_s": statistics.median(groups)}


def distribution(model, tok, ids, kind: str, reps: int, max_new_tokens: int) -> dict:
    logp, length, eos, texts = [], [], [], []
    for rep in range(reps):
        r = sample_once(model, tok, ids, kind, 10_000 + rep, max_new_tokens)
        logp.append(r.logprobs.sum(1))
        length.append(r.response_mask.sum(1).double())
        eos.append(r.ended_with_eos.double())
        texts += [tok.decode(x[m]) for x, m in zip(r.response_ids, r.response_mask)]
    gold = gold_rewards(texts)
    row = {"samples": len(texts)}
    for name, v in (("logprob", torch.cat(logp).double().numpy()), ("length", torch.cat(length).numpy()),
                    ("eos_share", torch.cat(eos).numpy()), ("gold", gold)):
        row[name], row[name + "_se"] = float(v.mean()), float(v.std() / np.sqrt(len(v)))
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a finished `prefalign demo` output folder (its sft/ and data/)")
    ap.add_argument("--reps", type=int, default=10, help="passes over the held-out prompts per draw")
    ap.add_argument("--batch", type=int, default=128, help="prompts in one timed `rollout.sample` call")
    ap.add_argument("--timing-reps", type=int, default=5, help="timed calls per draw (the median is reported)")
    ap.add_argument("--max-new-tokens", type=int, default=48, help="completion length cap (the demo's is 48)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    demo = Path(args.demo)
    model, tok = load_causal_lm(str(demo / "sft"))
    model.eval()
    ids = [prompt_ids(tok, r["prompt"]) for r in read_jsonl(demo / "data" / "prompts_heldout.jsonl")]
    out = {"demo": str(demo), "torch": torch.__version__, "threads": torch.get_num_threads(),
           "machine": platform.processor() or platform.machine(),
           "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    for kind in DRAWS:   # warm-up
        sample_once(model, tok, ids[:args.batch], kind, 0, args.max_new_tokens)
    for kind in DRAWS:
        out[kind] = {**timing(model, tok, ids[:args.batch], kind, args.timing_reps, args.max_new_tokens),
                     **distribution(model, tok, ids, kind, args.reps, args.max_new_tokens)}
        r = out[kind]
        print(f"{kind:12s} sample({args.batch}) {r['sample_s']:.3f}s  "
              f"sample_groups(16x8) {r['sample_groups_16x8_s']:.3f}s  "
              f"n={r['samples']}  logprob {r['logprob']:.2f}+-{r['logprob_se']:.2f}  length {r['length']:.2f}+-"
              f"{r['length_se']:.2f}  eos {r['eos_share']:.3f}+-{r['eos_share_se']:.3f}  gold {r['gold']:.4f}+-"
              f"{r['gold_se']:.4f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
