"""How far is each method from the optimum of its own objective? (issue #16; docs/demo.md)

A method that optimises the reward model r_RM against KL(pi || pi_SFT) can at most reach the reward model's own
optimum pi_SFT exp(r_RM / beta) / Z at its KL (lab.frontier.proxy_optimum). For every evaluated policy of a
finished `make demo` folder this scores the evaluation samples with the reward model (as `prefalign score`
does) and prints, at the policy's KL:

  rm        the policy's mean reward-model score, and the reward model's optimum's (rm_opt)
  rm share  (rm - rm_SFT) / (rm_opt - rm_SFT): how much of its own objective's attainable gain it reached
  gold      the policy's gold reward, the reward model's optimum's and the gold optimum's (results.json)

Both optima come from the SFT samples by SNIS (trusted while the harmonic-mean ESS >= 10; '*' marks a KL past
that). A policy with rm share well under 1 is held back by its optimiser, not by the reward model.

    python benchmarks/rm_optimum.py --demo /path/to/demo [--json out.json]
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from prefalign.lab.demo_eval import reward_model_scores
from prefalign.lab.frontier import MIN_ESS, FrontierPoint, optimum_at_kl, proxy_optimum


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--demo", required=True, help="a finished `prefalign demo` output folder")
    ap.add_argument("--json", help="also write the rows here")
    args = ap.parse_args()
    demo = Path(args.demo)
    samples = np.load(demo / "sft-samples" / "samples.npz")
    gold, proxy = samples["gold"], samples["proxy"]                              # (P, N)
    results = json.loads((demo / "results.json").read_text())
    frontier = [FrontierPoint(**p) for p in results["frontier"]]
    curve = sorted(proxy_optimum(gold, proxy, np.geomspace(0.05, 50, 80)), key=lambda p: p.mean_kl)
    kls = [p.mean_kl for p in curve]
    max_trusted = max(p.mean_kl for p in curve if p.ess_hmean >= MIN_ESS)
    rm_sft, gold_sft = float(proxy.mean()), float(gold.mean())
    print(f"SFT: rm {rm_sft:+.3f}, gold {gold_sft:.3f}; the reward model's optimum trusted to KL {max_trusted:.2f}")
    print(f"{'policy':<14} {'KL':>6} {'rm':>6} {'rm_opt':>6} {'rm share':>8} {'gold':>6} {'rm_opt':>6} {'gold_opt':>8}")
    max_length = json.loads((demo / "plan.json").read_text())["max_length"]
    rows = []
    for m in results["methods"]:
        if not m.get("policy"):
            continue
        name = Path(m["policy"]).name
        eval_rows = [json.loads(line) for line in open(demo / "eval" / name / "samples.jsonl")]
        scores = reward_model_scores(demo / "reward", [r["prompt"] for r in eval_rows],
                                     [r["completion"] for r in eval_rows], max_length)
        kl = m["kl"]
        row = {"policy": name, "kl": kl, "rm": float(scores.mean()), "gold": m["gold_reward"],
               "rm_opt_rm": float(np.interp(kl, kls, [p.proxy_reward for p in curve])),
               "rm_opt_gold": float(np.interp(kl, kls, [p.gold_reward for p in curve])),
               "gold_opt": optimum_at_kl(frontier, kl), "trusted": kl <= max_trusted}
        row["rm_share"] = (row["rm"] - rm_sft) / (row["rm_opt_rm"] - rm_sft)
        rows.append(row)
        print(f"{name:<14} {kl:6.2f}{'' if row['trusted'] else '*'} {row['rm']:+6.2f} {row['rm_opt_rm']:+6.2f} "
              f"{row['rm_share']:8.2f} {row['gold']:6.3f} {row['rm_opt_gold']:6.3f} {row['gold_opt']:8.3f}", flush=True)
    print("(* : past the KL where the reward model's optimum is trusted)")
    if args.json:
        Path(args.json).write_text(json.dumps({"rm_sft": rm_sft, "gold_sft": gold_sft, "max_trusted_kl": max_trusted,
                                               "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
