"""Per-token log-probs, entropy and argmax of a linear LM head, computed in chunks of tokens so
that no (N, V) logits tensor exists in the forward or the backward. Imports only torch.

For final hidden states h (N, H), head weight W (V, H) and bias b (V,), the logits of token n are
z_n = (h_n W^T + b) / temperature. The forward takes ``chunk_tokens`` rows at a time, computes
their logits in float32, keeps log p(y_n) = z_{n,y_n} - logsumexp(z_n) (and the entropy, the
argmax) and drops the logits; it saves only h, W, b, the targets and the per-token logsumexp. The
backward recomputes each chunk's logits and turns them into that chunk's share of dL/dh, dL/dW
and dL/db. Memory: one chunk of logits (chunk_tokens x V floats, a few copies in the backward)
instead of the N x V logits, their float32 copy and their gradient.

Precision follows the full path (``lm_head(h).float()`` then log-softmax): the matmul runs in the
autocast dtype when autocast is on (else in h's dtype), everything after it in float32.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F

CHUNK_LOGITS = 1 << 24  # default chunk: about 16M logits (64 MiB in float32) whatever the vocabulary


class TokenLogps(NamedTuple):
    """Per-token results of ``chunked_token_logps``; N = number of targets."""

    logps: torch.Tensor  # (N,) float32: log softmax(z)[target]; the NLL is -logps
    entropy: Optional[torch.Tensor]  # (N,) float32 entropy of softmax(z), when asked for
    argmax: Optional[torch.Tensor]  # (N,) long most likely token, when asked for (no gradient)


def default_chunk_tokens(vocab_size: int) -> int:
    return max(1, CHUNK_LOGITS // max(1, vocab_size))


def _compute_dtype(hidden: torch.Tensor) -> torch.dtype:
    """The dtype the full path's head matmul would run in: autocast's, else the hidden states'."""
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return hidden.dtype


def _chunk_logits(h, weight, bias, temperature):
    """(C, H) hidden rows -> (C, V) float32 logits divided by the temperature; weight/bias already cast."""
    z = F.linear(h.to(weight.dtype), weight, bias).float()  # (C, V)
    return z if temperature == 1.0 else z / temperature


class _ChunkedTokenLogps(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_tokens, compute_dtype, with_entropy,
                with_argmax):
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(compute_dtype)
            b = None if bias is None else bias.to(compute_dtype)
            valid = targets >= 0
            safe = targets.clamp(min=0)
            N = hidden.shape[0]
            lse = hidden.new_empty(N, dtype=torch.float32)
            logps = torch.empty_like(lse)
            entropy = torch.empty_like(lse) if with_entropy else None
            argmax = torch.empty(N, dtype=torch.long, device=hidden.device) if with_argmax else None
            for s in range(0, N, chunk_tokens):
                e = min(N, s + chunk_tokens)
                z = _chunk_logits(hidden[s:e], w, b, temperature)  # (C, V)
                lse[s:e] = torch.logsumexp(z, dim=-1)
                logps[s:e] = z.gather(-1, safe[s:e, None]).squeeze(-1) - lse[s:e]
                if with_argmax:
                    argmax[s:e] = z.argmax(-1)
                if with_entropy:  # H = logsumexp(z) - sum_v p_v z_v
                    entropy[s:e] = lse[s:e] - (torch.softmax(z, dim=-1) * z).sum(-1)
            logps = torch.where(valid, logps, torch.zeros((), device=logps.device))
        ctx.save_for_backward(hidden, weight, bias, targets, lse, entropy)
        ctx.temperature, ctx.chunk_tokens, ctx.compute_dtype = temperature, chunk_tokens, compute_dtype
        if with_argmax:
            ctx.mark_non_differentiable(argmax)
        return logps, entropy, argmax

    @staticmethod
    def backward(ctx, grad_logps, grad_entropy, _grad_argmax):
        hidden, weight, bias, targets, lse, entropy = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        T, C = ctx.temperature, ctx.chunk_tokens
        with torch.autocast(hidden.device.type, enabled=False):
            w = weight.to(ctx.compute_dtype)
            b = None if bias is None else bias.to(ctx.compute_dtype)
            valid = targets >= 0
            g_lp = torch.zeros_like(lse) if grad_logps is None else torch.where(valid, grad_logps.float(), 0.0)
            g_ent = None if grad_entropy is None or entropy is None else grad_entropy.float()
            grad_h = torch.empty_like(hidden) if need_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
            grad_b = torch.zeros(weight.shape[0], dtype=torch.float32, device=weight.device) if need_b else None
            rows = torch.arange(min(C, hidden.shape[0]), device=hidden.device)
            for s in range(0, hidden.shape[0], C):
                e = min(hidden.shape[0], s + C)
                z = _chunk_logits(hidden[s:e], w, b, T)  # (C, V) float32
                p = torch.softmax(z, dim=-1)
                # d log p_y / dz = onehot(y) - p;  dH / dz = -p (z - E_p[z]),  E_p[z] = logsumexp(z) - H
                if g_ent is not None:
                    grad_z = z.sub_((lse[s:e] - entropy[s:e])[:, None]).mul_(p).mul_(-g_ent[s:e, None])
                    grad_z.addcmul_(p, g_lp[s:e, None], value=-1.0)
                else:
                    grad_z = p.mul_(-g_lp[s:e, None])
                grad_z[rows[:e - s], targets[s:e].clamp(min=0)] += g_lp[s:e]
                if T != 1.0:
                    grad_z.div_(T)  # z = logits / T
                grad_logits = grad_z.to(ctx.compute_dtype)  # as the full path's low-precision logits get it
                if need_h:
                    grad_h[s:e] = (grad_logits @ w).to(hidden.dtype)
                if need_w:
                    grad_w += (grad_logits.t() @ hidden[s:e].to(ctx.compute_dtype)).float()
                if need_b:
                    grad_b += grad_logits.float().sum(0)
        return (grad_h, None if grad_w is None else grad_w.to(weight.dtype),
                None if grad_b is None else grad_b.to(bias.dtype), None, None, None, None, None, None)


def chunked_token_logps(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                        targets: torch.Tensor, temperature: float = 1.0, chunk_tokens: Optional[int] = None,
                        with_entropy: bool = False, with_argmax: bool = False) -> TokenLogps:
    """log softmax((hidden @ weight.T + bias) / temperature) at ``targets``, chunk by chunk.

    hidden (N, H), weight (V, H), bias (V,) or None, targets (N,) long (< 0: ignored, log-prob 0 and
    no gradient) -> TokenLogps with (N,) float32 logps [, entropy (N,) float32] [, argmax (N,) long].
    Differentiable in hidden, weight and bias (a tied embedding's weight gathers both gradients).
    chunk_tokens: rows per chunk; default ``CHUNK_LOGITS // V``.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"chunked_token_logps: hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} "
                         "must be (N, H) and (V, H).")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"chunked_token_logps: targets {tuple(targets.shape)} do not match hidden "
                         f"{tuple(hidden.shape)}; expected (N,).")
    if temperature <= 0:
        raise ValueError(f"chunked_token_logps: temperature must be positive, got {temperature}.")
    chunk = chunk_tokens or default_chunk_tokens(weight.shape[0])
    logps, entropy, argmax = _ChunkedTokenLogps.apply(hidden, weight, bias, targets, float(temperature), chunk,
                                                      _compute_dtype(hidden), with_entropy, with_argmax)
    return TokenLogps(logps, entropy, argmax)
