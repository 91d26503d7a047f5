"""Peak memory and time of one SFT forward + backward: full logits vs chunked head log-probs.

A narrow Llama (hidden 64, 2 layers, tied embeddings) with a real-size vocabulary (49152, SmolLM2's)
on B=2 rows of T=1024 tokens, every token a target: the (B, T, V) logits are the largest thing in
the step. Each (mode, round) runs in its own process, so ru_maxrss is that mode's peak alone:

    baseline  build the model and the batch, no step (imports, weights, batch)
    full      SFTObjective's full-logits branch (``head_logps`` answering None: the code before chunking)
    chunked   SFTObjective as shipped (``logits.head_logps``)

The worker runs ``--steps`` forward + backward passes and reports the median time of all but the
first. ``peak - baseline`` is what the step itself adds. Run:

    OMP_NUM_THREADS=1 python benchmarks/chunked_memory.py --rounds 2 > benchmarks/results/....txt
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

from bench_common import env_for, run_with_rss

MODES = ("baseline", "full", "chunked")


def build(args):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=4 * args.hidden,
                                         num_hidden_layers=args.layers, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=args.tokens, tie_word_embeddings=True, pad_token_id=0))
    B, T = args.batch, args.tokens
    batch = {"input_ids": torch.randint(1, args.vocab, (B, T)), "attention_mask": torch.ones(B, T, dtype=torch.bool),
             "position_ids": torch.arange(T).expand(B, T), "completion_mask": torch.ones(B, T, dtype=torch.bool)}
    return model, batch


def worker(args) -> None:
    model, batch = build(args)
    if args.worker == "baseline":
        print(json.dumps({"mode": "baseline"}))
        return
    import prefalign.stages.sft as sft
    if args.worker == "full":
        sft.head_logps = lambda *a, **k: None  # the full-logits branch
    objective, times, loss = sft.SFTObjective(), [], None
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = objective(model, batch).loss
        loss.backward()
        times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    print(json.dumps({"mode": args.worker, "step_s": statistics.median(times[1:] or times), "loss": float(loss)}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, default=49152)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--steps", type=int, default=3, help="forward + backward passes per process")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--worker", choices=MODES, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        return worker(args)
    import torch
    import transformers
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, threads {args.threads}; "
          f"V={args.vocab} H={args.hidden} layers={args.layers} B={args.batch} T={args.tokens}, fp32 CPU; "
          f"full logits (B, T, V) float32 = {args.batch * args.tokens * args.vocab * 4 / 2 ** 20:.0f} MiB")
    flags = [f"--{k}={getattr(args, k)}" for k in ("vocab", "hidden", "layers", "batch", "tokens", "steps")]
    results = {m: [] for m in MODES}
    for r in range(1, args.rounds + 1):
        for mode in MODES:
            run = run_with_rss([sys.executable, __file__, f"--worker={mode}", *flags], env=env_for(args.threads))
            row = [json.loads(l) for l in run["stdout"].splitlines() if l.startswith("{")][-1]
            row["rss_mib"] = run["rss_mib"]
            results[mode].append(row)
            extra = f" step_s={row['step_s']:.3f} loss={row['loss']:.4f}" if "step_s" in row else ""
            print(f"round {r} {mode}: peak_rss_mib={row['rss_mib']:.0f}{extra}", flush=True)
    base = min(x["rss_mib"] for x in results["baseline"])
    peak = {m: min(x["rss_mib"] for x in results[m]) for m in ("full", "chunked")}
    step = {m: min(x["step_s"] for x in results[m]) for m in ("full", "chunked")}
    print(f"best of {args.rounds}: baseline {base:.0f} MiB; full {peak['full']:.0f} MiB (+{peak['full'] - base:.0f}), "
          f"chunked {peak['chunked']:.0f} MiB (+{peak['chunked'] - base:.0f}); step memory chunked/full "
          f"{(peak['chunked'] - base) / (peak['full'] - base):.3f}, peak RSS chunked/full "
          f"{peak['chunked'] / peak['full']:.3f}; step time full {step['full']:.3f} s, chunked "
          f"{step['chunked']:.3f} s (chunked/full {step['chunked'] / step['full']:.2f})")


if __name__ == "__main__":
    main()
