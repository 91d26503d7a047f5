"""Generalised advantage estimation and whitening, over right-padded per-token rows.

Whitening's statistics are those of the global batch: under torchrun each rank holds a share
of the rollout, and its own mean and variance would whiten every share differently. In one
process ``global_moments`` is a plain masked mean and variance.
"""
from __future__ import annotations

import torch

from prefalign.ops import masked_sum


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Advantages and returns by GAE(gamma, lambda); no whitening here.

    rewards, values (B, T), mask (B, T) bool with each row's real tokens first (right padding, as
    rollout.Rollout lays responses out). Masked positions contribute nothing: the value after a row's
    last real token is 0 (the episode ended) and advantages/returns there are 0.
    Returns (advantages (B, T), returns (B, T)), returns = advantages + values.
    """
    zero = torch.zeros((), dtype=values.dtype, device=values.device)
    rewards = torch.where(mask, rewards, zero)
    values = torch.where(mask, values, zero)
    T = rewards.shape[1]
    last = torch.zeros_like(values[:, 0])  # (B,) advantage of the following step
    steps = []
    for t in reversed(range(T)):
        next_values = values[:, t + 1] if t + 1 < T else torch.zeros_like(last)
        delta = rewards[:, t] + gamma * next_values - values[:, t]  # TD residual delta_t, Schulman et al. 2016 Sec. 3
        last = torch.where(mask[:, t], delta + gamma * lam * last, zero)  # Schulman et al. 2016 eq. 16, recursively
        steps.append(last)
    advantages = torch.stack(steps[::-1], dim=1)  # (B, T)
    return advantages, torch.where(mask, advantages + values, zero)


def global_moments(x: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, unbiased variance and count of x over the masked entries of every rank's batch.

    x (B, T), mask (B, T) bool -> three scalars (mean and variance in x's dtype, the count in
    float64), the same on every rank. Two passes (mean, then squared deviations), each one
    all-reduce of float64 sums when torch.distributed is initialised; in one process they are
    differentiable, under torchrun constants.
    """
    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    x64 = x.detach().double() if distributed else x.double()  # no gradient through an all-reduce
    stats = torch.stack([masked_sum(x64, mask), mask.sum().double()])
    _all_reduce_sum(stats)
    n = stats[1]
    mean = stats[0] / n.clamp(min=1)
    sq = masked_sum((x64 - mean) ** 2, mask).reshape(1)
    _all_reduce_sum(sq)
    var = sq[0] / n.clamp(min=1) * n / (n - 1).clamp(min=1)  # Bessel's correction
    return mean.to(x.dtype), var.to(x.dtype), n


def _all_reduce_sum(t: torch.Tensor) -> None:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.SUM)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True) -> torch.Tensor:
    """Normalise x to unit variance (and zero mean when shift_mean) over its masked entries.

    x (B, T), mask (B, T) bool -> (B, T), 0 at masked positions. Statistics are over all counted
    tokens of the global batch (``global_moments``, unbiased variance); shift_mean=False keeps
    the original mean.
    """
    mean, var, _ = global_moments(x, mask)
    whitened = (x - mean) * torch.rsqrt(var + 1e-8)
    if not shift_mean:
        whitened = whitened + mean
    return torch.where(mask, whitened, torch.zeros((), dtype=x.dtype, device=x.device))
