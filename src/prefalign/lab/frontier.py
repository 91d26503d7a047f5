"""The yardsticks of the reward-vs-KL plot: the KL-regularised optimum and best-of-n.

The optimum of  max_pi E_pi[r*] - beta KL(pi || pi_SFT)  is (DPO paper eq. 4)

    pi*_beta(y | x) = pi_SFT(y | x) exp(r*(x, y) / beta) / Z(x).

We estimate it per prompt by self-normalised importance sampling (SNIS) over N samples
y_1..y_N ~ pi_SFT(. | x):  w_i = softmax_i(r_i / beta),  E*[r] ~ sum_i w_i r_i,
KL(pi* || pi_SFT) ~ sum_i w_i log(N w_i).

Bias, stated plainly: SNIS is biased for finite N (consistent as N -> oo), and the KL estimate
can never exceed log N (reached when one sample takes all the weight). So for small beta the
estimated frontier runs out of KL and sits below the true one: treat it as a lower bound on
the optimum that approaches it as N grows, and report N next to it.
"""
from __future__ import annotations

import math
from typing import NamedTuple, Sequence

import numpy as np


class FrontierPoint(NamedTuple):
    beta: float
    mean_reward: float
    mean_kl: float


def _softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(axis=-1, keepdims=True)


def optimum_frontier(rewards: np.ndarray, betas: Sequence[float]) -> list[FrontierPoint]:
    """Estimated (beta, E*[r], KL(pi*_beta || pi_SFT)) averaged over prompts.

    rewards: (P, N) gold rewards of N samples from pi_SFT for each of P prompts.
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    if rewards.ndim != 2:
        raise ValueError(f"rewards must be (prompts, samples), got shape {rewards.shape}")
    n = rewards.shape[1]
    points = []
    for beta in betas:
        w = _softmax(rewards / beta)                                     # (P, N), rows sum to 1
        mean_reward = (w * rewards).sum(axis=1)                          # (P,)
        kl = (w * np.log(np.maximum(n * w, 1e-300))).sum(axis=1)         # (P,), 0 <= kl <= log N
        points.append(FrontierPoint(float(beta), float(mean_reward.mean()), float(kl.mean())))
    return points


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || pi_SFT) = log n - (n - 1) / n (Stiennon et al. 2020); an upper bound
    on the true KL that is tight when samples rarely repeat (Beirami et al. 2024)."""
    return math.log(n) - (n - 1) / n


def best_of_n(rewards: np.ndarray, n: int, proxy: np.ndarray | None = None) -> tuple[float, float]:
    """Expected gold reward of best-of-n selection and its KL.

    rewards: (P, N) gold rewards of N >= n samples per prompt; proxy: (P, N) scores used to
    pick the best (a reward model; default: the gold reward itself). The expectation is exact
    over all n-subsets of the N samples: the sample ranked i-th (0-based, ascending proxy) is
    the maximum of a random n-subset with probability C(i, n-1) / C(N, n).
    Returns (mean gold reward of the pick, best_of_n_kl(n)).
    """
    rewards = np.asarray(rewards, dtype=np.float64)
    proxy = rewards if proxy is None else np.asarray(proxy, dtype=np.float64)
    if proxy.shape != rewards.shape:
        raise ValueError(f"proxy {proxy.shape} and rewards {rewards.shape} must have the same shape")
    total = rewards.shape[1]
    if not 1 <= n <= total:
        raise ValueError(f"n must be in [1, {total}], got {n}")
    order = np.argsort(proxy, axis=1, kind="stable")
    gold_sorted = np.take_along_axis(rewards, order, axis=1)                          # (P, N)
    p_max = np.array([math.comb(i, n - 1) for i in range(total)], dtype=np.float64) / math.comb(total, n)
    return float((gold_sorted @ p_max).mean()), best_of_n_kl(n)


def optimum_at_kl(frontier: Sequence[FrontierPoint], kl: float) -> float:
    """Optimal mean reward at ``kl``, linear in KL between frontier points; clamped at the ends
    (beyond the largest estimated KL this understates the optimum, see the module docstring)."""
    pts = sorted(frontier, key=lambda p: p.mean_kl)
    return float(np.interp(kl, [p.mean_kl for p in pts], [p.mean_reward for p in pts]))


def gain_share(method_reward: float, method_kl: float, frontier: Sequence[FrontierPoint], sft_reward: float) -> float:
    """(method - sft) / (optimum at the method's KL - sft): 1 = on the frontier, 0 = no gain.

    NaN when the optimum at that KL is no better than SFT (e.g. KL ~ 0), where a share means nothing.
    """
    denom = optimum_at_kl(frontier, method_kl) - sft_reward
    if denom <= 1e-12:
        return float("nan")
    return (method_reward - sft_reward) / denom
