"""A simulated Bradley-Terry labeler that prefers completions by the gold reward.

P(y1 > y2 | x) = sigma((r*(x, y1) - r*(x, y2)) / tau)      (Bradley & Terry 1952)

tau is the labeler's noise: tau -> 0 gives a perfect (deterministic) labeler, large tau a
coin flip. Because the labels are random even given the texts, no reward model can predict
them all; ``bayes_optimal_accuracy`` is the ceiling to report held-out accuracy against.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from prefalign.lab.gold import gold_rewards


def preference_probability(r1: np.ndarray, r2: np.ndarray, tau: float) -> np.ndarray:
    """P(y1 preferred) = sigma((r1 - r2) / tau), elementwise, shape of r1. tau = 0: 1, 0 or 0.5 (tie)."""
    diff = np.asarray(r1, dtype=np.float64) - np.asarray(r2, dtype=np.float64)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    if tau == 0:
        return 0.5 * (1.0 + np.sign(diff))
    return 0.5 * (1.0 + np.tanh(diff / (2.0 * tau)))   # = sigma(diff / tau), without overflow


def bayes_optimal_accuracy(r1: np.ndarray, r2: np.ndarray, tau: float) -> float:
    """mean over pairs of max(p, 1 - p) with p = sigma((r1 - r2) / tau).

    This is the best expected pairwise accuracy ANY reward model can reach on labels drawn by
    this labeler: knowing p exactly, the best guess is the likelier side and is right with
    probability max(p, 1 - p). A reward model's held-out accuracy above it is sampling noise.
    """
    p = preference_probability(r1, r2, tau)
    return float(np.mean(np.maximum(p, 1.0 - p)))


def label_pairs(prompts: Sequence[str], completions_a: Sequence[str], completions_b: Sequence[str], tau: float,
                seed: int = 0, score: Callable[[Sequence[str]], np.ndarray] | None = None) -> list[dict]:
    """One Bradley-Terry label per (prompt, a, b).

    The gold reward scores the whole review, prompt + completion, as the sentiment classifier
    does in DPO sec. 6.1; pass ``score`` (texts -> (N,) rewards) to change that.
    Returns rows {prompt, chosen, rejected, p_true, gold_chosen, gold_rejected} where
    p_true is the labeler's probability of the preference it recorded (chosen over rejected).
    """
    if not len(prompts) == len(completions_a) == len(completions_b):
        raise ValueError(f"prompts, completions_a and completions_b differ in length: "
                         f"{len(prompts)}, {len(completions_a)}, {len(completions_b)}")
    score = score or gold_rewards
    r_a = score([p + c for p, c in zip(prompts, completions_a)])   # (N,)
    r_b = score([p + c for p, c in zip(prompts, completions_b)])   # (N,)
    p_a = preference_probability(r_a, r_b, tau)                      # (N,) P(a > b)
    a_wins = np.random.default_rng(seed).random(len(prompts)) < p_a
    rows = []
    for i, prompt in enumerate(prompts):
        if a_wins[i]:
            rows.append({"prompt": prompt, "chosen": completions_a[i], "rejected": completions_b[i],
                         "p_true": float(p_a[i]), "gold_chosen": float(r_a[i]), "gold_rejected": float(r_b[i])})
        else:
            rows.append({"prompt": prompt, "chosen": completions_b[i], "rejected": completions_a[i],
                         "p_true": float(1.0 - p_a[i]), "gold_chosen": float(r_b[i]), "gold_rejected": float(r_a[i])})
    return rows
