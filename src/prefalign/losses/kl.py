"""Per-token estimators of KL(pi || ref) from tokens sampled from pi (Schulman, "Approximating KL
divergence", 2020). With r = ref(x) / pi(x) and x ~ pi:
  k1 = -log r                  unbiased, high variance, can be negative
  k2 = 0.5 (log r)^2           biased, low variance, >= 0
  k3 = (r - 1) - log r         unbiased, low variance, >= 0
"""
from __future__ import annotations

from typing import Callable

import torch


def _k1(log_ratio: torch.Tensor) -> torch.Tensor:
    return log_ratio


def _k2(log_ratio: torch.Tensor) -> torch.Tensor:
    return 0.5 * log_ratio ** 2


def _k3(log_ratio: torch.Tensor) -> torch.Tensor:
    return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r with log r = -log_ratio


KL_ESTIMATORS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"k1": _k1, "k2": _k2, "k3": _k3}


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token KL estimate from log pi(x) and log ref(x) of sampled tokens: (B, T), (B, T) -> (B, T)."""
    if kind not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimate: unknown kind {kind!r}; choose one of {sorted(KL_ESTIMATORS)}.")
    return KL_ESTIMATORS[kind](logprobs - ref_logprobs)
