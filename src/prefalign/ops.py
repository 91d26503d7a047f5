"""Tensor helpers shared by losses, stages and rollout: log-probs of labels, masked reductions,
per-segment sums for packed rows. Imports only torch.

Masks are bool and True means "count this token". Logits passed here are already aligned with
their labels (``logits[:, t]`` predicts ``labels[:, t]``); ``next_token_inputs`` does the shift.
"""
from __future__ import annotations

from typing import Optional

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def token_logps(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Log-probability of each label under softmax(logits), computed in float32 (or float64).

    logits (B, T, V), labels (B, T) long -> (B, T) float32 (float64 for float64 logits).
    Labels < 0 (e.g. -100) give 0; mask them out anyway.

    Memory: log p(y) = logit_y - logsumexp(logits) needs no (B, T, V) log_softmax copy.
    Half-precision logits are upcast one row at a time, so the float32 copy is (T, V), not (B, T, V).
    """
    if logits.shape[:-1] != labels.shape:
        raise ValueError(f"token_logps: logits {tuple(logits.shape)} do not match labels {tuple(labels.shape)}; "
                         "expected logits (B, T, V) and labels (B, T).")
    valid = labels >= 0
    safe_labels = labels.clamp(min=0).unsqueeze(-1)  # (B, T, 1)
    if logits.dtype in _LOW_PRECISION:
        rows = []
        for row_logits, row_labels in zip(logits, safe_labels):  # (T, V), (T, 1)
            row_logits = row_logits.float()
            rows.append(row_logits.gather(-1, row_labels).squeeze(-1) - torch.logsumexp(row_logits, dim=-1))
        logps = torch.stack(rows)  # (B, T)
    else:
        logps = logits.gather(-1, safe_labels).squeeze(-1) - torch.logsumexp(logits, dim=-1)  # (B, T)
    return torch.where(valid, logps, torch.zeros_like(logps))


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Sum of x where mask is True. x and mask broadcast; dim=None sums everything.

    Uses where() rather than x * mask so inf/nan at masked positions cannot leak into the sum.
    """
    x = torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))
    return x.sum() if dim is None else x.sum(dim)


def _count(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int]) -> torch.Tensor:
    mask = mask.expand_as(x) if mask.shape != x.shape else mask
    n = mask.sum() if dim is None else mask.sum(dim)
    return n.to(x.dtype)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None) -> torch.Tensor:
    """Mean of x over positions where mask is True (0 where nothing is counted)."""
    return masked_sum(x, mask, dim) / _count(x, mask, dim).clamp(min=1)


def masked_var(x: torch.Tensor, mask: torch.Tensor, dim: Optional[int] = None, unbiased: bool = True) -> torch.Tensor:
    """Variance of x over positions where mask is True.

    unbiased: Bessel's correction n / (n - 1); with a single counted element the biased value (0) is returned
    instead of dividing by zero.
    """
    mean = masked_mean(x, mask, dim)
    if dim is not None:
        mean = mean.unsqueeze(dim)
    var = masked_mean((x - mean) ** 2, mask, dim)
    if unbiased:
        n = _count(x, mask, dim)
        var = var * n / (n - 1).clamp(min=1)
    return var


def sequence_logps(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed and mean log-probability of the masked labels of each row.

    logits (B, T, V) aligned with labels (B, T); mask (B, T) bool, True = counted token.
    Returns (sum (B,), mean (B,)); the mean of a row with no counted token is 0.
    """
    logps = token_logps(logits, labels)  # (B, T)
    total = masked_sum(logps, mask, dim=-1)  # (B,)
    return total, total / mask.sum(-1).clamp(min=1).to(total.dtype)


def segment_sum(values: torch.Tensor, segment_ids: torch.Tensor, n_segments: int) -> torch.Tensor:
    """Sum values per segment of a packed row.

    values (1, T) or (T,), segment_ids the same shape with ids 0..n_segments-1 (-1 = padding, ignored)
    -> (n_segments,). Differentiable in values.
    """
    if values.shape != segment_ids.shape:
        raise ValueError(f"segment_sum: values {tuple(values.shape)} and segment_ids {tuple(segment_ids.shape)} differ.")
    values, segment_ids = values.reshape(-1), segment_ids.reshape(-1)  # (T,)
    keep = segment_ids >= 0
    out = torch.zeros(n_segments, dtype=values.dtype, device=values.device)
    return out.index_add(0, segment_ids[keep], values[keep])


def next_token_inputs(logits: torch.Tensor, input_ids: torch.Tensor,
                      completion_mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Align a causal LM's outputs with its targets: logits[:, t] predicts input_ids[:, t + 1].

    (B, T, V), (B, T), (B, T) -> (B, T-1, V), (B, T-1), (B, T-1).
    """
    return logits[:, :-1], input_ids[:, 1:], completion_mask[:, 1:]


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Entropy of softmax(logits) at each position, in float32 (float64 for float64 logits).

    logits (B, T, V) -> (B, T). H = logsumexp(z) - sum_v softmax(z)_v z_v.
    Half-precision logits are upcast one row at a time to bound the float32 copy.
    """
    def _entropy(z):  # (..., V)
        return torch.logsumexp(z, dim=-1) - (torch.softmax(z, dim=-1) * z).sum(-1)

    if logits.dtype in _LOW_PRECISION:
        return torch.stack([_entropy(row.float()) for row in logits])
    return _entropy(logits)
