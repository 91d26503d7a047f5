"""PPO losses for language models: the clipped policy surrogate and the clipped value loss.

Per-token tensors (B, T) with a bool mask (True = a real response token); losses are masked means
over tokens, returned with detached metrics.
"""
from __future__ import annotations

import torch

from prefalign.ops import masked_mean


def ppo_policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, cliprange: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped surrogate objective, negated to a loss and averaged over masked tokens.

    logprobs (B, T) under the current policy (with grad), old_logprobs (B, T) from the rollout,
    advantages (B, T), mask (B, T) bool. Returns (loss scalar, metrics) with metrics["clipfrac"]
    (fraction of tokens where the clipped term is the active one) and metrics["approxkl"]
    (0.5 * mean (log ratio)^2, an estimate of KL(old || new)), both detached.
    """
    # Zeroed at masked positions so exp() cannot overflow there and poison the gradient.
    log_ratio = torch.where(mask, logprobs - old_logprobs, torch.zeros_like(logprobs))  # (B, T)
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1 - cliprange, 1 + cliprange)
    loss = masked_mean(torch.maximum(unclipped, clipped), mask)  # Schulman et al. 2017 eq. 7 (negated)
    metrics = {
        "clipfrac": masked_mean((clipped > unclipped).to(logprobs.dtype), mask).detach(),
        "approxkl": (0.5 * masked_mean(log_ratio ** 2, mask)).detach(),
    }
    return loss, metrics


def ppo_value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                   cliprange_value: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss 0.5 * max((v - R)^2, (clip(v, v_old - c, v_old + c) - R)^2), masked mean.

    values (B, T) with grad, old_values (B, T) from the rollout, returns (B, T), mask (B, T) bool.
    Returns (loss scalar, metrics) with metrics["vf_clipfrac"] detached.
    """
    values_clipped = old_values + torch.clamp(values - old_values, -cliprange_value, cliprange_value)
    unclipped = (values - returns) ** 2  # (B, T)
    clipped = (values_clipped - returns) ** 2
    # Value clipping as in OpenAI baselines ppo2 and Ziegler et al. 2019
    loss = 0.5 * masked_mean(torch.maximum(unclipped, clipped), mask)
    return loss, {"vf_clipfrac": masked_mean((clipped > unclipped).to(values.dtype), mask).detach()}
