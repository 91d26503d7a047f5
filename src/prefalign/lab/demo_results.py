"""Turn the demo's stage directories into results.json's content, training curves and side-by-side samples.

Share of the optimum's gain at equal KL (lab.frontier.gain_share): (r_method - r_SFT) / (r*(KL) - r_SFT),
where r*(KL) is the estimated optimum at the method's KL. A method's headline share is its best
setting among those whose optimum gain r*(KL) - r_SFT is at least MIN_GAIN_FRACTION of the largest
gain the frontier shows: near KL = 0 both gains are tiny and their ratio is mostly sampling noise.
"""
from __future__ import annotations

import datetime
import json
import math
import os
import platform
import re
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from prefalign.lab.demo_data import read_jsonl
from prefalign.lab.frontier import gain_share, optimum_at_kl, proxy_optimum
from prefalign.train.logger import read_metrics

MIN_GAIN_FRACTION = 0.1
# every trained method (DPO, PPO, RLOO, GRPO, online DPO) should reach 70 % of the optimum's gain at equal KL
TARGET_SHARE = 0.7
TARGET_RM_GAP = 0.03          # reward model within 3 points of the Bayes-optimal accuracy
# Curves worth a panel, by the key names the stages log; anything else is left to metrics.jsonl.
SKIP_CURVE = ("perf/", "bad_steps", "epoch", "grad_norm", "policy/first_minibatch")


def summary(d: Path) -> dict:
    return json.loads((d / "summary.json").read_text())


def policy_row(method: str, eval_dir: Path, **knobs) -> dict:
    s = summary(eval_dir)
    return {"method": method, **knobs, "gold_reward": s["gold_reward"], "kl": s["kl"],
            "win_rate_vs_sft": s["win_rate_vs_sft"], "gold_reward_se": s["gold_reward_se"],
            "policy": s["policy"]}


def add_gain_shares(methods: list[dict], frontier, sft_reward: float) -> dict:
    """Write gain_share into every row; return each method family's headline share.

    The optimum at a method's KL is interpolated through every frontier point. Past the KL of the
    last *trusted* point (lab.frontier: enough effective samples) the estimate of the optimum is
    likely low (SNIS misses mass its proposals rarely reach) and past the last point it is held flat,
    so a share there is an upper bound: such rows get ``beyond_frontier: true``, and a headline comes
    from them only when a method has no row inside the trusted range (it then carries
    ``upper_bound: true``).
    """
    max_kl = max((p.mean_kl for p in frontier if p.trusted), default=0.0)
    by_method: dict[str, dict] = {}
    for m in methods:
        if m["method"] == "sft":
            m["gain_share"] = None
            continue
        m["gain_share"] = gain_share(m["gold_reward"], m["kl"], frontier, sft_reward)
        m["optimum_at_kl"] = optimum_at_kl(frontier, m["kl"])
        m["beyond_frontier"] = m["kl"] > max_kl
        if not (share_is_meaningful(frontier, m["kl"], sft_reward) and math.isfinite(m["gain_share"])):
            continue
        best = by_method.get(m["method"])
        rank = (not m["beyond_frontier"], m["gain_share"])
        if best is None or rank > (not best["upper_bound"], best["gain_share"]):
            by_method[m["method"]] = {"gain_share": m["gain_share"], "kl": m["kl"], "gold_reward": m["gold_reward"],
                                      "upper_bound": m["beyond_frontier"],
                                      **{k: m[k] for k in ("beta", "n", "step", "gain_share_se")
                                         if m.get(k) is not None}}
    return by_method


def share_is_meaningful(frontier, kl: float, sft_reward: float) -> bool:
    """Whether the optimum's gain at ``kl`` is at least MIN_GAIN_FRACTION of the largest the frontier shows:
    near KL = 0 both gains of a share are tiny and their ratio mostly sampling noise."""
    top_gain = max(p.mean_reward for p in frontier) - sft_reward
    return optimum_at_kl(frontier, kl) - sft_reward >= MIN_GAIN_FRACTION * top_gain


def reward_model_optimum(gold: np.ndarray, proxy: np.ndarray, frontier_betas: Sequence[float], frontier,
                         sft_reward: float) -> dict:
    """The reward model's own optimum pi_SFT exp(r_RM / beta) / Z (lab.frontier.proxy_optimum, from the SFT
    samples), its gold reward and its share of the gold optimum's gain at its KL: the most a method that
    optimises the reward model exactly could get, so a method's distance to it is its optimiser's, and the
    rest of the way to the gold optimum is the reward model's.

    gold, proxy: (P, N). Its betas are the frontier's times beta_scale, the ratio of the two rewards' spreads
    within a prompt, so both curves span about the same KL. A share is null where the gold optimum's gain is
    under MIN_GAIN_FRACTION of its largest, as for a method's headline."""
    scale = float(proxy.std(axis=1).mean() / max(gold.std(axis=1).mean(), 1e-12))
    points = []
    for p in proxy_optimum(gold, proxy, [b * scale for b in frontier_betas]):
        share = gain_share(p.gold_reward, p.mean_kl, frontier, sft_reward)
        meaningful = share_is_meaningful(frontier, p.mean_kl, sft_reward) and math.isfinite(share)
        points.append({**p._asdict(), "gain_share": share if meaningful else None})
    return {"beta_scale": scale, "points": points}


def share_text(m: dict, plus_minus: str = "+-") -> str:
    """A row's share as the table prints it: '<= ' past the trusted frontier, then the share and its
    standard error over prompts ('' for SFT)."""
    share, se = m.get("gain_share"), m.get("gain_share_se")
    if share is None or not math.isfinite(share):
        return ""
    error = f" {plus_minus} {se:.2f}" if se is not None and math.isfinite(se) else ""
    return ("<= " if m.get("beyond_frontier") or m.get("upper_bound") else "") + f"{share:.2f}{error}"


def targets(results: dict) -> dict:
    """The issue's targets for the default run, each with its measured value and whether it is met."""
    rm = results["reward_model"]
    gap = rm["bayes_optimal_accuracy"] - rm["heldout_accuracy"]
    out = {"reward_model_within_3_points_of_bayes": {"gap": gap, "met": gap <= TARGET_RM_GAP}}
    trained = [m["method"] for m in results["methods"] if m["method"] not in ("sft", "best-of-n")]
    for method in dict.fromkeys(trained):          # every trained method, in the order they ran
        best = results["gain_share_by_method"].get(method, {})
        share, bound = best.get("gain_share"), bool(best.get("upper_bound"))
        # An upper bound at or above the target does not show the target is reached.
        out[f"{method}_at_least_70pct_of_optimum_gain"] = {"share": share, "share_se": best.get("gain_share_se"),
                                                          "upper_bound": bound,
                                                          "met": share is not None and share >= TARGET_SHARE
                                                          and not bound}
    return out


def curves(out: Path, stages: Sequence[tuple[str, Optional[str]]]) -> dict[str, list[dict]]:
    """metrics.jsonl rows per training stage: (stage name, curve name or None). Stages that share a
    curve name (the segments of one PPO, RLOO, GRPO or online DPO run) join into one curve, steps continued."""
    result: dict[str, list[dict]] = {}
    for name, joined in stages:
        rows = read_metrics(out / name / "metrics.jsonl")
        rows = [{k: v for k, v in r.items() if not k.startswith(SKIP_CURVE)} for r in rows]
        if joined:
            offset = len(result.get(joined, [])) and result[joined][-1]["step"]
            result.setdefault(joined, []).extend({**r, "step": r["step"] + offset} for r in rows)
        elif rows:
            result[name] = rows
    return result


def side_by_side(out: Path, n_shown: int, frontier_samples: int, policies: dict[str, str],
                 best_of: Optional[int]) -> list[dict]:
    """The first n_shown held-out prompts with one completion from SFT, each policy and best-of-n."""
    sft = read_jsonl(out / "sft-samples" / "samples.jsonl")          # prompt-major, N per prompt
    samples_npz = np.load(out / "sft-samples" / "samples.npz")
    gold, proxy = samples_npz["gold"], samples_npz["proxy"]
    shown = []
    for i in range(min(n_shown, gold.shape[0])):
        row = sft[i * frontier_samples]
        entry = {"prompt": row["prompt"], "completions": {"SFT": row["completion"]}, "rewards": {"SFT": gold[i, 0]}}
        for label, eval_name in policies.items():
            rows = read_jsonl(out / "eval" / eval_name / "samples.jsonl")   # sample-major: row i is prompt i
            entry["completions"][label] = rows[i]["completion"]
            entry["rewards"][label] = rows[i]["gold"]
        if best_of:
            j = int(np.argmax(proxy[i, :best_of]))                   # the reward model's pick of the first n
            entry["completions"][f"best-of-{best_of}"] = sft[i * frontier_samples + j]["completion"]
            entry["rewards"][f"best-of-{best_of}"] = gold[i, j]
        shown.append(entry)
    return shown


def unknown_word_rate(corpus: Path, samples: Path) -> float:
    """Share of the words (letter runs) the samples' completions wrote that the corpus never uses.

    Words are read from prompt + completion, so a word the completion finishes ("p" + "ouring")
    counts whole; the prompt's other words and the completion's last word (the token budget may
    cut it) are left out.
    """
    def letters(text: str) -> list[str]:
        return re.findall(r"[A-Za-z]+", text)

    vocab = {w for row in read_jsonl(corpus) for w in letters(row["text"])}
    words = []
    for row in read_jsonl(samples):
        words += letters(row["prompt"] + row["completion"])[max(len(letters(row["prompt"])) - 1, 0):-1]
    return float(np.mean([w not in vocab for w in words])) if words else float("nan")


def stage_times(out: Path) -> dict[str, float]:
    """Each stage's wall time when it ran (stages reused from an earlier run keep their own),
    and their total: wall_time_s covers only this invocation."""
    times = {}
    for path in sorted(out.glob("*/summary.json")) + sorted(out.glob("eval/*/summary.json")):
        t = json.loads(path.read_text()).get("demo_wall_time_s")
        if t is not None:
            times[str(path.parent.relative_to(out))] = t
    return {**times, "total": sum(times.values())}


def machine() -> dict:
    import torch
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "load_average_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
