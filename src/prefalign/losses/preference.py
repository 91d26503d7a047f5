"""Pairwise preference losses: Bradley-Terry for reward models, DPO and its variants for policies.

Pure functions of tensors: unreduced per-example losses plus detached metrics. Which log-probs go in
is the caller's choice: summed completion log-probs for DPO, mean log-probs for length-normalised
(SimPO-style) training; an NLL term on the chosen completion (RPO) is also added by the caller.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F


def bradley_terry_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                       margin: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """-log sigma(r_chosen - r_rejected - margin) per pair.

    chosen_rewards (B,), rejected_rewards (B,), margin (B,) or None -> (losses (B,), metrics) with
    metrics["accuracy"] = fraction of pairs with r_chosen > r_rejected (ties count as wrong) and
    metrics["margin"] = mean of r_chosen - r_rejected, both detached scalars.
    """
    diff = chosen_rewards - rejected_rewards  # (B,)
    logits = diff if margin is None else diff - margin
    losses = -F.logsigmoid(logits)  # Ouyang et al. 2022 eq. 1; with margin: Touvron et al. 2023 (Llama 2) eq. 2
    metrics = {"accuracy": (diff > 0).to(diff.dtype).mean().detach(), "margin": diff.mean().detach()}
    return losses, metrics


# Each DPO variant maps h = (log pi(y_w) - log ref(y_w)) - (log pi(y_l) - log ref(y_l)), shape (B,),
# to per-pair losses (B,). They match TRL's DPOTrainer definitions of the same names.

def _sigmoid(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Rafailov et al. 2023 eq. 7; eps > 0 is conservative DPO (Mitchell 2023): labels flipped with probability eps
    return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)


def _robust(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Chowdhury et al. 2024 (rDPO): unbiased loss under label-flip rate eps
    return (-(1 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (1 - 2 * eps)


def _hinge(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Zhao et al. 2023 (SLiC-HF) calibration loss with margin 1, on beta * h as in TRL
    return torch.relu(1 - beta * h)


def _ipo(h: torch.Tensor, beta: float, eps: float) -> torch.Tensor:
    # Azar et al. 2023 eq. 17 with tau = beta: h itself (not beta * h) regresses to 1 / (2 beta)
    return (h - 1 / (2 * beta)) ** 2


DPO_LOSSES: dict[str, Callable[[torch.Tensor, float, float], torch.Tensor]] = {
    "sigmoid": _sigmoid,
    "robust": _robust,
    "hinge": _hinge,
    "ipo": _ipo,
}

def _check_dpo_args(beta: float, loss_type: str, label_smoothing: float) -> None:
    if loss_type not in DPO_LOSSES:
        raise ValueError(f"dpo_loss: unknown loss_type {loss_type!r}; choose one of {sorted(DPO_LOSSES)}.")
    if beta <= 0:
        raise ValueError(f"dpo_loss: beta must be positive, got {beta}.")
    if loss_type in ("hinge", "ipo") and label_smoothing != 0:
        raise ValueError(f"dpo_loss: label_smoothing applies to the sigmoid and robust losses only, "
                         f"not {loss_type!r}; set it to 0.")
    if loss_type == "sigmoid" and not 0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5] for 'sigmoid', got {label_smoothing}.")
    if loss_type == "robust" and not 0 <= label_smoothing < 0.5:
        raise ValueError(f"dpo_loss: label_smoothing must lie in [0, 0.5) for 'robust' (it divides by "
                         f"1 - 2 * label_smoothing), got {label_smoothing}.")


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, *, beta: float,
             loss_type: str = "sigmoid", label_smoothing: float = 0.0, reference_free: bool = False,
             target_margin: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss and its variants, per pair.

    All log-prob inputs are (B,): summed (or, for length normalisation, mean) completion log-probs.
    loss_type: "sigmoid" (DPO; conservative DPO when label_smoothing > 0), "robust" (rDPO),
        "hinge" (SLiC), "ipo" (IPO). See DPO_LOSSES.
    reference_free: treat the reference log-probs as 0 (the ref tensors are ignored and may be None).
    target_margin: gamma of SimPO; h becomes h - gamma / beta, so the sigmoid loss is
        -log sigma(beta * h - gamma). It shifts every loss type the same way.
    Returns (losses (B,), chosen_rewards (B,), rejected_rewards (B,)), rewards = beta * (policy - ref), detached.
    """
    _check_dpo_args(beta, loss_type, label_smoothing)
    if reference_free:
        ref_chosen_logps = torch.zeros_like(policy_chosen_logps)
        ref_rejected_logps = torch.zeros_like(policy_rejected_logps)
    chosen_logratios = policy_chosen_logps - ref_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - ref_rejected_logps  # (B,)
    h = chosen_logratios - rejected_logratios  # Rafailov et al. 2023 eq. 7, the argument of sigma divided by beta
    h = h - target_margin / beta  # Meng et al. 2024 (SimPO) eq. 6: sigma(beta * h - gamma)
    losses = DPO_LOSSES[loss_type](h, beta, label_smoothing)
    return losses, (beta * chosen_logratios).detach(), (beta * rejected_logratios).detach()
