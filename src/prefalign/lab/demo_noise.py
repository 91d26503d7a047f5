"""Standard errors of the shares of the optimum's gain, over held-out prompts (a bootstrap).

A share (r_method - r_SFT) / (r*(KL_method) - r_SFT) is a ratio of four averages over the same
held-out prompts: the method's gold reward and KL, SFT's gold reward and the optimum's curve
(reward and KL per beta, each a mean of per-prompt estimates: lab.frontier.tilted_estimates). The
bootstrap resamples the prompts with replacement, recomputes all four on each resample and the
share from them; the standard error is the spread of those shares. It holds the prompts' noise
(which prompts were drawn, and each prompt's few samples), not the noise of training: a second
seed measures that (docs/demo.md).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np

from prefalign.lab.frontier import best_of_n_kl, best_of_n_rewards, tilted_estimates

N_BOOTSTRAP = 400


class PerPrompt(NamedTuple):
    """(P,) per-prompt means: gold reward and KL(pi || pi_SFT)."""
    reward: np.ndarray
    kl: np.ndarray


def policy_per_prompt(eval_dir: Path, n_prompts: int) -> PerPrompt:
    """From an evaluation's samples.npz (sample-major, (K * P,))."""
    data = np.load(eval_dir / "samples.npz")
    k = len(data["gold"]) // n_prompts
    kl = (data["policy_logps"] - data["sft_logps"]).reshape(k, n_prompts).mean(0)
    return PerPrompt(data["gold"].reshape(k, n_prompts).mean(0), kl)


def best_of_n_per_prompt(gold: np.ndarray, proxy: np.ndarray, n: int) -> PerPrompt:
    """The reward model's pick of n SFT samples; its KL (log n - (n - 1) / n) is the same for every prompt."""
    return PerPrompt(best_of_n_rewards(gold, n, proxy), np.full(gold.shape[0], best_of_n_kl(n)))


def frontier_per_prompt(rewards, ref_logps, proposal_logps, counts, betas: Sequence[float],
                        threshold=None) -> PerPrompt:
    """(B, P) per-prompt reward and KL of pi*_beta for each beta (the pool's estimates, not averaged);
    threshold as lab.frontier.tilted_estimates' (pi_SFT the first proposal)."""
    est = [tilted_estimates(rewards, ref_logps, proposal_logps, counts, b, threshold) for b in betas]
    return PerPrompt(np.stack([e.mean_reward for e in est]), np.stack([e.kl for e in est]))


def share_standard_errors(rows: Sequence[PerPrompt], sft_reward: np.ndarray, frontier: PerPrompt,
                          n_bootstrap: int = N_BOOTSTRAP, seed: int = 0) -> list[float]:
    """Bootstrap standard error of each row's share, resampling prompts (module docstring).

    rows: per-prompt (P,) reward and KL of each method setting; sft_reward: (P,) SFT's mean gold
    reward per prompt; frontier: (B, P) per beta. NaN for a row whose share is undefined (the
    optimum no better than SFT at its KL) on more than a tenth of the resamples."""
    n_prompts = len(sft_reward)
    idx = np.random.default_rng(seed).integers(0, n_prompts, size=(n_bootstrap, n_prompts))   # (R, P)
    sft = sft_reward[idx].mean(1)                                                              # (R,)
    f_reward, f_kl = frontier.reward[:, idx].mean(-1), frontier.kl[:, idx].mean(-1)           # (B, R)
    order = np.argsort(f_kl, axis=0)
    f_reward, f_kl = np.take_along_axis(f_reward, order, 0), np.take_along_axis(f_kl, order, 0)
    out = []
    for row in rows:
        reward, kl = row.reward[idx].mean(1), row.kl[idx].mean(1)                              # (R,)
        optimum = np.array([np.interp(kl[r], f_kl[:, r], f_reward[:, r]) for r in range(n_bootstrap)])
        gain = optimum - sft
        ok = gain > 1e-12
        if ok.mean() < 0.9:
            out.append(math.nan)
            continue
        out.append(float(np.std((reward[ok] - sft[ok]) / gain[ok], ddof=1)))
    return out
