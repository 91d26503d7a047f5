"""Critic-free policy gradients over groups of K completions per prompt: RLOO and GRPO advantages,
the clipped surrogate with separate low/high clips, and the loss aggregations of GRPO, DAPO and
Dr. GRPO.

Layout: a rollout of P prompts x K completions is flat, (N,) = (P * K,), prompt p's completions at
rows p * K ... p * K + K - 1 (the order `stages/grpo.py` samples them in). Per-token tensors are
(N, T) with a bool mask, True = a real completion token.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch

from prefalign.losses.kl import kl_estimate

ESTIMATORS = ("grpo", "rloo")
SCALES = ("group", "batch", "none")
AGGREGATIONS = ("token", "sequence", "constant")
STD_EPS = 1e-4  # as TRL: a group whose rewards are all equal gets advantages 0, not 0 / 0


def group_std(rewards: torch.Tensor, k: int) -> torch.Tensor:
    """The unbiased standard deviation of each prompt's K rewards: (P * K,) -> (P,)."""
    return rewards.view(-1, k).std(dim=1)


def group_advantages(rewards: torch.Tensor, k: int, estimator: str = "grpo", scale: str = "group",
                     batch_std: Optional[torch.Tensor] = None) -> torch.Tensor:
    """One advantage per completion from the rewards of its prompt's group: (P * K,) -> (P * K,).

    estimator  "grpo": A_i = r_i - mean_j r_j (Shao et al. 2024, eq. 3's numerator);
               "rloo": A_i = r_i - 1/(K-1) sum_{j != i} r_j, the leave-one-out baseline
               (Kool et al. 2019; Ahmadian et al. 2024, eq. 6) = K/(K-1) (r_i - mean_j r_j).
    scale      "group": divided by the group's std (+ 1e-4) (GRPO); "batch": by the std of all
               rewards, ``batch_std`` when given (the global batch under torchrun), else of
               ``rewards``; "none": not scaled (Dr. GRPO, Liu et al. 2025; plain RLOO).
    """
    if estimator not in ESTIMATORS or scale not in SCALES:
        raise ValueError(f"group_advantages: estimator must be one of {ESTIMATORS} and scale one of {SCALES}, "
                         f"got {estimator!r} and {scale!r}.")
    if k < 2 or rewards.ndim != 1 or rewards.numel() % k:
        raise ValueError(f"group_advantages: need K >= 2 and (P * K,) rewards, got K={k} and {tuple(rewards.shape)}.")
    groups = rewards.view(-1, k)  # (P, K)
    mean = groups.mean(dim=1, keepdim=True)  # (P, 1)
    if estimator == "grpo":
        advantages = groups - mean  # Shao et al. 2024 eq. 3 (numerator)
    else:
        baseline = (groups.sum(dim=1, keepdim=True) - groups) / (k - 1)  # Ahmadian et al. 2024 eq. 6
        advantages = groups - baseline
    if scale == "group":
        advantages = advantages / (groups.std(dim=1, keepdim=True) + STD_EPS)  # Shao et al. 2024 eq. 3
    elif scale == "batch":
        std = batch_std if batch_std is not None else rewards.std()
        advantages = advantages / (std + STD_EPS)
    return advantages.reshape(-1)


class PolicyLoss(NamedTuple):
    loss: torch.Tensor          # scalar: the aggregated loss (with grad)
    per_token: torch.Tensor     # (N, T) per-token loss before aggregation, detached, 0 where masked
    low_clipped: torch.Tensor   # (N, T) bool: ratio < 1 - eps_low with a negative advantage
    high_clipped: torch.Tensor  # (N, T) bool: ratio > 1 + eps_high with a positive advantage
    kl: Optional[torch.Tensor]  # (N, T) per-token k3 KL to the reference, detached; None without one


def aggregation_weights(mask: torch.Tensor, aggregation: str, max_tokens: Optional[int] = None,
                        n_sequences: Optional[float] = None, n_tokens: Optional[float] = None) -> torch.Tensor:
    """Per-token weights whose weighted sum is the aggregated loss: (N, T) bool -> (N, T) float.

    "token"     1 / (tokens in the batch): DAPO's token-level mean (Yu et al. 2025, eq. 8);
    "sequence"  1 / (|o_i| * sequences): GRPO's mean over each completion, then over completions
                (Shao et al. 2024, eq. 3);
    "constant"  1 / (sequences * max_tokens): Dr. GRPO's constant normaliser (Liu et al. 2025, eq. 3).
    ``n_sequences`` / ``n_tokens`` replace this batch's counts when the batch is one rank's share of
    a global minibatch: each rank's weighted sum is then its part of the global loss.
    """
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}.")
    m = mask.to(torch.float32)
    n_seq = float(mask.shape[0]) if n_sequences is None else float(n_sequences)
    if aggregation == "token":
        return m / max(float(m.sum()) if n_tokens is None else float(n_tokens), 1.0)
    if aggregation == "sequence":
        return m / m.sum(dim=1, keepdim=True).clamp(min=1) / n_seq
    if max_tokens is None or max_tokens < 1:
        raise ValueError("aggregation 'constant' needs max_tokens (the completion length limit).")
    return m / (n_seq * max_tokens)


def clipped_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                        mask: torch.Tensor, eps_low: float, eps_high: float, aggregation: str = "token",
                        max_tokens: Optional[int] = None, ref_logprobs: Optional[torch.Tensor] = None,
                        beta: float = 0.0, n_sequences: Optional[float] = None,
                        n_tokens: Optional[float] = None) -> PolicyLoss:
    """The clipped surrogate with one advantage per sequence, plus beta * k3 KL per token when
    ``ref_logprobs`` is given, aggregated by ``aggregation_weights``.

    logprobs (N, T) under the current policy (with grad), old_logprobs (N, T) from the rollout,
    advantages (N,), mask (N, T) bool, ref_logprobs (N, T) or None.
    """
    zero = torch.zeros((), dtype=logprobs.dtype, device=logprobs.device)
    # Zeroed at masked positions so exp() cannot overflow there and poison the gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, zero)  # (N, T)
    ratio = torch.exp(log_ratio)
    adv = advantages[:, None].to(logprobs.dtype)  # (N, 1)
    clipped_ratio = torch.clamp(ratio, 1 - eps_low, 1 + eps_high)  # DAPO clip-higher (Yu et al. 2025, eq. 10)
    per_token = -torch.minimum(ratio * adv, clipped_ratio * adv)  # Schulman et al. 2017 eq. 7, negated
    kl = None
    if ref_logprobs is not None:
        kl = torch.where(mask, kl_estimate(logprobs, ref_logprobs, "k3"), zero)  # Shao et al. 2024 eq. 4
        per_token = per_token + beta * kl
    per_token = torch.where(mask, per_token, zero)
    weights = aggregation_weights(mask, aggregation, max_tokens, n_sequences, n_tokens)
    loss = (per_token * weights).sum()
    low = mask & (ratio < 1 - eps_low) & (adv < 0)
    high = mask & (ratio > 1 + eps_high) & (adv > 0)
    return PolicyLoss(loss, per_token.detach(), low, high, None if kl is None else kl.detach())
