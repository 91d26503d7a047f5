"""The judge of online DPO: which of two completions of a prompt is chosen, from their scores.

Deterministic (tau = 0): the higher score wins; on a tie the first completion is chosen, as TRL's
OnlineDPOTrainer does (``first >= second``). Both completions are independent draws from the same
policy, so a fixed rule for ties gives chosen/rejected pairs with the distribution of a fair coin.

Simulated labeler (tau > 0): the Bradley-Terry model of the demo lab (lab/labeler.py),

    P(y1 > y2 | x) = sigma((r1 - r2) / tau)                    (Bradley & Terry 1952)

sampled with one uniform u per pair: y1 is chosen when u < P. Equal scores give P = 1/2.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch


class Judgement(NamedTuple):
    first_chosen: torch.Tensor  # (B,) bool: completion 1 of pair b is the chosen one
    p_first: torch.Tensor       # (B,) float64: P(y1 > y2), 1 / 0 for the deterministic judge


def preference_probability(first: torch.Tensor, second: torch.Tensor, tau: float) -> torch.Tensor:
    """P(y1 > y2) = sigma((r1 - r2) / tau) for tau > 0; for tau = 0, 1 where r1 >= r2 (ties: the first), else 0.
    (B,) scores each -> (B,) float64."""
    if tau < 0:
        raise ValueError(f"preference_probability: tau must be >= 0, got {tau}.")
    diff = first.double() - second.double()  # (B,)
    if tau == 0:
        return (diff >= 0).double()  # TRL's OnlineDPOTrainer: mask = first_half >= second_half
    return torch.sigmoid(diff / tau)  # Bradley-Terry with temperature tau


def judge_pairs(first: torch.Tensor, second: torch.Tensor, tau: float,
                uniforms: Optional[torch.Tensor] = None) -> Judgement:
    """Order each pair: (B,) scores of completions 1 and 2 -> Judgement. ``uniforms`` (B,) in [0, 1)
    decide the Bradley-Terry draws (required when tau > 0, ignored otherwise)."""
    p = preference_probability(first, second, tau)
    if tau == 0:
        return Judgement(p > 0.5, p)
    if uniforms is None or uniforms.shape != p.shape:
        raise ValueError(f"judge_pairs: tau > 0 needs one uniform per pair ({tuple(p.shape)}).")
    return Judgement(uniforms.to(p) < p, p)
