"""An online method's knobs against the demo's optimum (issue #16; docs/demo.md).

Trains `prefalign online-dpo`, `rloo` or `grpo` from a finished `make demo` folder's SFT model exactly as the
demo's stage does (lab.demo_stages.online_dpo_segment and group_segment: segments continuing the last, online
DPO judged by the lab's labeler, RLOO and GRPO by the folder's reward model), with the plan's settings of that
method replaced by the options given, evaluates every segment's policy on the held-out
prompts as the demo's eval stage does, and prints its gold reward, KL and share of the optimum's gain at that
KL against the folder's frontier (results.json; '*' marks a KL past its trusted range).

The share is the point estimate of `prefalign demo`'s own (which also puts the policies into the frontier's
pool, so its frontier can differ slightly); its standard error over prompts is about 0.02 in the demo's runs.
A segment whose evaluation is already under --out is not run again (give the same options), so a killed screen
resumes; a screen started before the demo folder has its results.json (it needs the folder's sft, reward, data
and sft-samples) prints gold and KL only: run it again with the same --out once the demo has finished.

    python benchmarks/method_knobs.py --demo DEMO --out DIR --method online-dpo|rloo|grpo|dpo [--beta B] [--lr LR]
        [--segments S] [--iterations I] [--prompts P] [--minibatch M] [--generations K] [--epochs E] [--json F]
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import time
from pathlib import Path

import numpy as np

from prefalign.lab import demo_eval, demo_stages
from prefalign.lab.demo_plan import DemoPlan
from prefalign.lab.demo_results import add_gain_shares
from prefalign.lab.frontier import FrontierPoint

KNOBS = ("beta", "lr", "segments", "iterations", "prompts", "minibatch", "generations", "epochs")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a finished `prefalign demo` output folder")
    ap.add_argument("--out", required=True, help="where the runs and their evaluations go")
    ap.add_argument("--method", required=True, choices=("online-dpo", "rloo", "grpo", "dpo", "ppo"))
    ap.add_argument("--seed", type=int, default=0, help="the demo's --seed (segment s trains with seed + s - 1)")
    ap.add_argument("--json", help="also write the rows here")
    for name in KNOBS:
        ap.add_argument(f"--{name}", type=float if name in ("beta", "lr") else int,
                        help=f"the method's {name} in the plan (OnlineDPOPlan or GroupPlan; online DPO has no "
                             "generations or epochs; DPO takes beta (required), lr, minibatch (dpo_batch) and "
                             "epochs (dpo_epochs), one run on the folder's pairs; PPO the ppo_ fields, beta its "
                             "kl_coef, prompts its rollout batch; default: the demo folder's plan)")
    ap.add_argument("--reward-fn", help="PPO only: score with this reward function (module:function or "
                    "path/to/file.py:function) instead of the reward model, which then only starts the value model; "
                    "e.g. benchmarks/ppo_length_rewards.py:gold10, the gold reward on the labels' scale")
    args = ap.parse_args()
    if args.method == "dpo":
        return dpo_screen(args)
    if args.method == "ppo":
        return ppo_screen(args)
    demo, out = Path(args.demo), Path(args.out)
    finished = demo / "results.json"
    results = json.loads(finished.read_text()) if finished.exists() else None
    recorded = json.loads((demo / "plan.json").read_text())
    fields = {f.name: f for f in dataclasses.fields(DemoPlan)}
    attr = args.method.replace("-", "_")
    plan = {k: v for k, v in recorded.items() if k in fields and not isinstance(v, (dict, list))}
    # results.json's settings hold every field of the plan the folder ran; plan.json leaves out a later method
    # at its default of that time (demo_plan.recorded), which need not be today's
    method = (results["settings"] if results else recorded).get(attr)
    if isinstance(method, dict):
        plan[attr] = type(fields[attr].default)(**method)
    base = DemoPlan(**plan)
    o = dataclasses.replace(getattr(base, attr),
                            **{k: getattr(args, k) for k in KNOBS if getattr(args, k) is not None})
    sft_gold = np.load(demo / "sft-samples" / "samples.npz")["gold"]
    print(f"{args.method} {o}", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    rows, previous = [], None
    for segment in range(1, o.segments + 1):
        run_dir, eval_dir = out / f"{args.method}-{segment}", out / "eval" / f"{args.method}-{segment}"
        if not (run_dir / "summary.json").exists():                  # not trained, or killed while training
            shutil.rmtree(run_dir, ignore_errors=True)
            start_model, seed = previous or demo / "sft", args.seed + segment - 1
            prompts = demo / "data" / "prompts_train.jsonl"
            start = time.perf_counter()
            if args.method == "online-dpo":
                demo_stages.online_dpo_segment(run_dir, False, start_model, demo / "sft", prompts, base, o, seed)
            else:
                demo_stages.group_segment(run_dir, False, args.method, start_model, demo / "sft", demo / "reward",
                                          prompts, base, o, seed)
            (run_dir / "train_seconds.json").write_text(json.dumps(time.perf_counter() - start) + "\n")
        if not (eval_dir / "summary.json").exists():
            eval_dir.mkdir(parents=True, exist_ok=True)
            demo_eval.evaluate(eval_dir, run_dir, demo / "sft", demo / "data", base, args.seed, sft_gold)
        s = json.loads((eval_dir / "summary.json").read_text())
        rows.append({"method": args.method, "iteration": segment * o.iterations, "gold_reward": s["gold_reward"],
                     "kl": s["kl"], "train_seconds": json.loads((run_dir / "train_seconds.json").read_text())})
        print(f"segment {segment}: gold {s['gold_reward']:.3f} at KL {s['kl']:.2f}", flush=True)
        previous = run_dir
    if results:
        frontier = [FrontierPoint(**p) for p in results["frontier"]]
        sft_reward = next(m["gold_reward"] for m in results["methods"] if m["method"] == "sft")
        add_gain_shares(rows, frontier, sft_reward)              # gain_share, optimum_at_kl, beyond_frontier
        max_trusted = max((p.mean_kl for p in frontier if p.trusted), default=0.0)
        print(f"SFT gold {sft_reward:.3f}; frontier trusted to KL {max_trusted:.2f} ('*': past it)")
        print(f"{'iteration':>9} {'gold':>6} {'KL':>6} {'optimum':>7} {'share':>6} {'train s':>7}")
        for row in rows:
            past = "*" if row["beyond_frontier"] else " "
            print(f"{row['iteration']:9d} {row['gold_reward']:6.3f} {row['kl']:6.2f}{past}"
                  f"{row['optimum_at_kl']:7.3f} {row['gain_share']:6.2f} {row['train_seconds']:7.0f}")
    else:
        print(f"{finished} is not there yet: run this again with the same --out once the demo has finished "
              "for the shares (the segments are not run again)")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": args.method, "settings": dataclasses.asdict(o),
                                               "rows": rows}, indent=1) + "\n")


def folder_plan(demo: Path, results) -> DemoPlan:
    """The plan the demo folder ran (its scalar fields: the methods' own plans at their defaults)."""
    recorded = json.loads((demo / "plan.json").read_text())
    fields = {f.name for f in dataclasses.fields(DemoPlan)}
    source = results["settings"] if results else recorded
    plan = {k: tuple(v) if isinstance(v, list) else v for k, v in source.items()
            if k in fields and not isinstance(v, dict)}
    return DemoPlan(**{"name": source.get("plan", "default"), **plan})


def dpo_screen(args) -> None:
    """One DPO run on the folder's own pairs (lab.demo_stages.dpo, as its dpo-betaB stage), its lr, batch and epochs
    replaced; evaluated and shared as the online methods' segments."""
    if args.beta is None:
        raise SystemExit("--method dpo needs --beta")
    demo, out = Path(args.demo), Path(args.out)
    results = json.loads((demo / "results.json").read_text())
    knobs = {"dpo_lr": args.lr, "dpo_batch": args.minibatch, "dpo_epochs": args.epochs}
    plan = dataclasses.replace(folder_plan(demo, results), **{k: v for k, v in knobs.items() if v is not None})
    print(f"dpo beta {args.beta:g}, lr {plan.dpo_lr:g}, batch {plan.dpo_batch}, epochs {plan.dpo_epochs:g}", flush=True)
    run_dir, eval_dir = out / f"dpo-beta{args.beta:g}", out / "eval" / f"dpo-beta{args.beta:g}"
    if not (run_dir / "summary.json").exists():
        shutil.rmtree(run_dir, ignore_errors=True)
        start = time.perf_counter()
        demo_stages.dpo(run_dir, False, demo / "sft", demo / "preferences" / "prefs.jsonl", args.beta, plan, args.seed)
        (run_dir / "train_seconds.json").write_text(json.dumps(time.perf_counter() - start) + "\n")
    if not (eval_dir / "summary.json").exists():
        eval_dir.mkdir(parents=True, exist_ok=True)
        sft_gold = np.load(demo / "sft-samples" / "samples.npz")["gold"]
        demo_eval.evaluate(eval_dir, run_dir, demo / "sft", demo / "data", plan, args.seed, sft_gold)
    s = json.loads((eval_dir / "summary.json").read_text())
    row = {"method": "dpo", "beta": args.beta, "gold_reward": s["gold_reward"], "kl": s["kl"],
           "train_seconds": json.loads((run_dir / "train_seconds.json").read_text())}
    frontier = [FrontierPoint(**p) for p in results["frontier"]]
    sft_reward = next(m["gold_reward"] for m in results["methods"] if m["method"] == "sft")
    add_gain_shares([row], frontier, sft_reward)
    past = " (past the frontier's trusted KL: an upper bound)" if row["beyond_frontier"] else ""
    print(f"gold {row['gold_reward']:.3f} at KL {row['kl']:.2f}, optimum there {row['optimum_at_kl']:.3f}, share "
          f"{row['gain_share']:.2f}{past}; {row['train_seconds']:.0f} s")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": "dpo", "settings": {"beta": args.beta, "lr": plan.dpo_lr,
                                               "batch": plan.dpo_batch, "epochs": plan.dpo_epochs},
                                               "rows": [row]}, indent=1) + "\n")


PPO_KNOBS = {"beta": "ppo_kl_coef", "lr": "ppo_lr", "segments": "ppo_segments", "iterations": "ppo_iterations",
             "prompts": "ppo_rollout_batch", "minibatch": "ppo_minibatch", "epochs": "ppo_epochs"}


def ppo_screen(args) -> None:
    """PPO in segments as the demo's ppo-K stages (lab.demo_stages.ppo_segment: each continues the last one's
    policy and value model), its knobs or its reward (--reward-fn) replaced; evaluated and shared per segment."""
    demo, out = Path(args.demo), Path(args.out)
    results = json.loads((demo / "results.json").read_text())
    knobs = {field: getattr(args, k) for k, field in PPO_KNOBS.items() if getattr(args, k) is not None}
    plan = dataclasses.replace(folder_plan(demo, results), **knobs)
    print(f"ppo kl_coef {plan.ppo_kl_coef:g}, lr {plan.ppo_lr:g}, {plan.ppo_segments} x {plan.ppo_iterations} "
          f"iterations of {plan.ppo_rollout_batch} (minibatch {plan.ppo_minibatch}, {plan.ppo_epochs} epochs), "
          f"reward {args.reward_fn or 'the reward model'}", flush=True)
    sft_gold = np.load(demo / "sft-samples" / "samples.npz")["gold"]
    rows, previous = [], None
    for segment in range(1, plan.ppo_segments + 1):
        run_dir, eval_dir = out / f"ppo-{segment}", out / "eval" / f"ppo-{segment}"
        if not (run_dir / "summary.json").exists():
            shutil.rmtree(run_dir, ignore_errors=True)
            start, value = (demo / "sft", None) if previous is None else (previous, previous / "value_model")
            began = time.perf_counter()
            demo_stages.ppo_segment(run_dir, False, start, value, demo / "sft", demo / "reward",
                                    demo / "data" / "prompts_train.jsonl", plan, args.seed + segment - 1,
                                    reward_fn=args.reward_fn)
            (run_dir / "train_seconds.json").write_text(json.dumps(time.perf_counter() - began) + "\n")
        if not (eval_dir / "summary.json").exists():
            eval_dir.mkdir(parents=True, exist_ok=True)
            demo_eval.evaluate(eval_dir, run_dir, demo / "sft", demo / "data", plan, args.seed, sft_gold)
        s = json.loads((eval_dir / "summary.json").read_text())
        rows.append({"method": "ppo", "iteration": segment * plan.ppo_iterations, "gold_reward": s["gold_reward"],
                     "kl": s["kl"], "train_seconds": json.loads((run_dir / "train_seconds.json").read_text())})
        print(f"segment {segment}: gold {s['gold_reward']:.3f} at KL {s['kl']:.2f}", flush=True)
        previous = run_dir
    frontier = [FrontierPoint(**p) for p in results["frontier"]]
    sft_reward = next(m["gold_reward"] for m in results["methods"] if m["method"] == "sft")
    add_gain_shares(rows, frontier, sft_reward)
    print(f"SFT gold {sft_reward:.3f}; frontier trusted to KL "
          f"{max((p.mean_kl for p in frontier if p.trusted), default=0.0):.2f} ('*': past it)")
    print(f"{'iteration':>9} {'gold':>6} {'KL':>6} {'optimum':>7} {'share':>6} {'train s':>7}")
    for row in rows:
        past = "*" if row["beyond_frontier"] else " "
        print(f"{row['iteration']:9d} {row['gold_reward']:6.3f} {row['kl']:6.2f}{past}{row['optimum_at_kl']:7.3f}"
              f" {row['gain_share']:6.2f} {row['train_seconds']:7.0f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"method": "ppo", "reward_fn": args.reward_fn, "settings": knobs,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
