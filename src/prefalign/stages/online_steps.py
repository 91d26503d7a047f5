"""Optimizer steps of the online loops over the global rollout: global minibatches that are slices
of one seeded permutation (each rank computes the loss of the members it holds), one AdamW step all
ranks take or skip together, and the check that the ranks' copies of the weights stayed identical
(ppo's too). Because the minibatches are global, N processes take the steps one process with N
times the prompts takes."""
from __future__ import annotations

from typing import Iterator, Optional

import torch

from prefalign.train.dist import DistInfo, all_gather_object, average_gradients, check_replicas, param_digest
from prefalign.train.harness import Meter, agree
from prefalign.train.loop import scheduler_step
from prefalign.train.optim import clip_and_check


def global_minibatches(n_local: int, minibatch_size: int, dist: DistInfo,
                       seed: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One pass over the global rollout of n_local x processes items (rank r holds items
    r * n_local ...) in minibatches of ``minibatch_size`` x processes, shuffled by ``seed``.
    Yields (members (G,) global indices, mine: this rank's members as local indices)."""
    world = dist.world_size
    n_global, mb_global, offset = n_local * world, minibatch_size * world, n_local * dist.rank
    order = torch.randperm(n_global, generator=torch.Generator().manual_seed(seed))
    for first in range(0, n_global, mb_global):
        members = order[first:first + mb_global]
        yield members, members[(members >= offset) & (members < offset + n_local)] - offset


def take_step(cfg, params: list, optimizer, scheduler, dist: DistInfo, meter: Meter, finite: bool, loss_value: float,
              metrics: dict) -> bool:
    """After this rank's backward: average the gradients over ranks, clip, and step when every
    rank's loss and the gradients are finite (``metrics`` and the loss into ``meter`` then). Returns
    whether the step was taken; the gradients are zeroed and the schedule advances either way."""
    average_gradients(params, dist.world_size)
    grad_norm, grads_finite = clip_and_check(params, cfg.max_grad_norm)
    finite, _ = agree(finite and grads_finite, None, dist)  # all ranks skip, or none
    if finite:
        optimizer.step()
        once = 1 if dist.is_main else 0  # the loss is the sum of the ranks' shares; the norm is global
        meter.add({**metrics, "loss": (loss_value, once), "grad_norm": (float(grad_norm) * once, once)})
    optimizer.zero_grad(set_to_none=True)
    scheduler_step(scheduler)
    return finite


class ReplicaCheck:
    """The online loops update each rank's copy of the weights themselves (no DDP), so the copies must
    stay bit-identical: compared (sha256 per model of ``models.trainable``) before every checkpoint, so
    none is written from ranks that diverged, and at the end."""

    def __init__(self, models, dist: DistInfo):
        self.m, self.dist, self.checks = models, dist, 0

    def digests(self) -> dict[str, str]:
        return {name: param_digest(module) for name, module in self.m.trainable.items()}

    def check(self, step: Optional[int] = None) -> Optional[dict[str, str]]:
        """Compare the ranks' digests (before the checkpoint of iteration ``step``, or at the end)."""
        if not self.dist.distributed:
            return None
        mine = self.digests()
        check_replicas(all_gather_object(mine), f"at iteration {step}" if step is not None else "at the end")
        self.checks += 1
        return mine

    def check_at_end(self) -> Optional[dict[str, str]]:
        return self.check()
