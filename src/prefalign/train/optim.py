"""AdamW, warmup then constant/linear/cosine decay, and one guarded optimizer step."""
from __future__ import annotations

import math
from typing import Optional

import torch


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float = 0.0, betas=(0.9, 0.999),
                   eps: float = 1e-8, submodule_lrs: Optional[dict[str, float]] = None) -> torch.optim.AdamW:
    """AdamW over trainable parameters; no weight decay on biases and norm weights (1-D tensors).
    ``submodule_lrs`` gives named children their own peak LR (PPO's value model: --value-lr)."""
    own = {name: list(model.get_submodule(name).parameters()) for name in (submodule_lrs or {})}
    special = {id(p) for params in own.values() for p in params}
    groups = weight_decay_groups([p for p in model.parameters() if id(p) not in special], lr, weight_decay)
    for name, params in own.items():
        groups += weight_decay_groups(params, submodule_lrs[name], weight_decay)
    # The fused kernel is about 3x faster than the per-tensor loop (fixture model on CPU: 1.7 vs
    # 5.3 ms a step). Its rounding differs from the loop's (fp32 weights ~1e-7 apart after a few
    # steps), but it is deterministic, so runs and resumes with the same optimizer stay bitwise.
    # Sharded (DTensor) parameters and other devices take the loop.
    params = [p for g in groups for p in g["params"]]
    fused = bool(params) and all(type(p) in (torch.Tensor, torch.nn.Parameter) and p.device.type in ("cpu", "cuda")
                                 and p.is_floating_point() for p in params)
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=False, fused=fused or None)


def weight_decay_groups(parameters, lr: float, weight_decay: float) -> list[dict]:
    """The trainable ``parameters`` as AdamW groups at ``lr``: matrices decay, 1-D tensors do not."""
    decay, no_decay = [], []
    for p in parameters:
        if p.requires_grad:
            (decay if p.ndim >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lr": lr},
              {"params": no_decay, "weight_decay": 0.0, "lr": lr}]
    return [g for g in groups if g["params"]]


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak LR at optimizer step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    if schedule == "linear":
        return 1.0 - progress
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")


def make_scheduler(optimizer, total_steps: int, warmup_steps: int = 0, warmup_ratio: float = 0.0,
                   schedule: str = "linear") -> torch.optim.lr_scheduler.LambdaLR:
    warmup = warmup_steps or int(round(warmup_ratio * total_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, warmup, total_steps, schedule))


def clip_and_check(parameters, max_grad_norm: float) -> tuple[torch.Tensor, bool]:
    """Global grad norm (clipped to max_grad_norm when > 0) and whether every gradient is finite."""
    params = [p for p in parameters if p.grad is not None]
    if not params:
        return torch.tensor(0.0), True
    if max_grad_norm > 0:
        norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    else:
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(p.grad.float()) for p in params]))
    # DTensor (FSDP2) norms come back as DTensors; full_tensor() gives the global value.
    if hasattr(norm, "full_tensor"):
        norm = norm.full_tensor()
    return norm.detach(), bool(torch.isfinite(norm))
