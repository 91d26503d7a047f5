"""The one training loop every supervised stage uses (SFT, reward, DPO), on the run harness
(train/harness.py: resume, save, signals, bad steps, logging).

A stage hands the loop an *objective*:

    objective.units(batch) -> float        how many units (tokens, pairs) the loss sums over,
                                           known before the forward pass
    objective(model, batch) -> LossOutput  the SUM of per-unit losses plus metric (sum, count)s

The loop divides every micro-batch's loss sum by the units of the whole optimizer step
(all micro-batches, all ranks). So micro-batch 4 x accumulation 2 gives the same gradients
as 8 x 1, and N processes with batch B the same as one process with batch N*B.

Data order: one permutation per epoch from (seed, epoch); each optimizer step takes the next
global batch (batch_size * grad_accum * world_size examples; an incomplete one at the end of
an epoch is dropped) and rank r takes its contiguous slice. The position (epoch, offset) is
part of every checkpoint, so a resumed run sees exactly the batches it would have seen.

Under torchrun the global batch is what must stay fixed: a checkpoint written by N processes
resumes in M when --batch-size x --grad-accum x M equals the checkpoint's global batch (checked).
Per-step decisions (skip a non-finite step, stop on a signal) are agreed by all ranks, and
checkpoints are gathered by all ranks and written by rank 0 (train/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import math
import sys
import time
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from prefalign.errors import ConfigError
from prefalign.train.dist import DistInfo, all_reduce_sum, no_grad_sync
from prefalign.train.harness import LoopResult, Meter, Run, TrainingStopped
from prefalign.train.optim import clip_and_check, make_optimizer, make_scheduler

__all__ = ["LossOutput", "LoopResult", "Objective", "TrainingStopped", "backward_step", "epoch_order", "evaluate",
           "fit", "rank_batch_indices", "to_device", "autocast_for", "scheduler_step"]


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: SUM of per-unit losses over the micro-batch (carries grad)
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (sum, count), detached


class Objective(Protocol):
    def units(self, batch: dict) -> float: ...

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput: ...


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    g = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return torch.randperm(n, generator=g).tolist()


def rank_batch_indices(order: Sequence[int], offset: int, batch_size: int, grad_accum: int, rank: int,
                       world_size: int) -> list[int]:
    """The examples rank ``rank`` trains on at step ``offset`` of an epoch: its contiguous slice of
    that step's global batch (batch_size * grad_accum * world_size entries of ``order``). The
    slices of all ranks are disjoint and together are exactly the global batch."""
    per_rank = batch_size * grad_accum
    start = offset * per_rank * world_size + rank * per_rank
    return list(order[start:start + per_rank])


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}


def autocast_for(device: torch.device, dtype: str):
    """bf16 autocast on CUDA (weights stay fp32); nothing on CPU, where we train in fp32."""
    if device.type == "cuda" and dtype in ("auto", "bfloat16"):
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def count_tokens(batch: dict) -> int:
    """Real (non-pad) tokens fed to the model: what perf/tokens_per_s counts."""
    if "segment_ids" in batch and torch.is_tensor(batch["segment_ids"]):  # packed rows: padding is segment -1
        return int((batch["segment_ids"] >= 0).sum())
    if "attention_mask" in batch and torch.is_tensor(batch["attention_mask"]):
        return int(batch["attention_mask"].sum())
    if "input_ids" in batch:
        return int(batch["input_ids"].numel())
    return 0


def plan_steps(cfg, n_examples: int, world_size: int) -> tuple[int, int]:
    """(steps per epoch, total optimizer steps) for a data set of n examples."""
    global_batch = cfg.batch_size * cfg.grad_accum * world_size
    per_epoch = n_examples // global_batch
    if per_epoch == 0:
        raise ConfigError(f"the training data has {n_examples} examples, fewer than one global batch "
                          f"(--batch-size {cfg.batch_size} x --grad-accum {cfg.grad_accum} x {world_size} "
                          f"process(es) = {global_batch}). Lower --batch-size or --grad-accum, or add data.")
    total = cfg.max_steps if cfg.max_steps > 0 else max(1, math.ceil(cfg.epochs * per_epoch))
    return per_epoch, total


def evaluate(model, objective: Objective, eval_set: Sequence, collate: Callable, batch_size: int,
             dist: DistInfo, dtype: str = "auto") -> dict[str, float]:
    """Mean of every metric over eval_set (sharded over ranks), keys prefixed with eval/."""
    was_training = model.training
    model.eval()
    meter = Meter()
    mine = list(range(dist.rank, len(eval_set), dist.world_size))
    # Every rank runs the same number of forwards (FSDP forwards are collectives); a rank out of
    # examples runs a stand-in batch and drops its result.
    n_batches = math.ceil(math.ceil(len(eval_set) / dist.world_size) / batch_size)
    with torch.no_grad():
        for i in range(0, n_batches * batch_size, batch_size):
            idx = mine[i:i + batch_size]
            batch = to_device(collate([eval_set[j] for j in (idx or [0])]), dist.device)
            with autocast_for(dist.device, dtype):
                out = objective(model, batch)
            if idx:
                meter.add({"loss": (out.loss.detach(), objective.units(batch)), **out.metrics})
    model.train(was_training)
    return {f"eval/{k}": v for k, v in finalize(objective, meter.reduce(dist.device)).items()}


def finalize(objective, metrics: dict[str, float]) -> dict[str, float]:
    """Objectives may derive metrics from reduced means (e.g. a std from E[r] and E[r^2])."""
    return objective.finalize(metrics) if hasattr(objective, "finalize") else metrics


def backward_step(model, objective: Objective, micro: list[dict], dist: DistInfo, dtype: str = "auto"):
    """Forward + backward over the micro-batches of one optimizer step; gradients accumulate
    as sum(per-unit losses) / (units of the whole step over all ranks).

    Returns (loss_sum on this rank, global units, metric sums, tokens on this rank)."""
    # On the training device: NCCL reduces CUDA tensors only.
    units_t = torch.tensor(float(sum(objective.units(mb) for mb in micro)), dtype=torch.float64, device=dist.device)
    all_reduce_sum(units_t)
    units = units_t.item()
    W = dist.world_size
    metrics: dict[str, tuple[float, float]] = {}
    loss_sum, tokens = 0.0, 0
    for k, mb in enumerate(micro):
        mb = to_device(mb, dist.device)
        tokens += count_tokens(mb)
        with no_grad_sync(model, sync=(k == len(micro) - 1)), autocast_for(dist.device, dtype):
            out = objective(model, mb)
        # DDP averages gradients over ranks, hence the factor W.
        (out.loss * (W / units)).backward()
        loss_sum += float(out.loss.detach())
        for name, (s, c) in out.metrics.items():
            ps, pc = metrics.get(name, (0.0, 0.0))
            metrics[name] = (ps + float(s), pc + float(c))
    return loss_sum, units, metrics, tokens




def scheduler_step(scheduler) -> None:
    """Advance the LR schedule; a skipped (non-finite) step advances it too, which torch warns about."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        scheduler.step()


class Throughput:
    """The perf/ keys of a logged row: rates over the steps since the previous logged row."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.t, self.cpu, self.tokens, self.steps = time.perf_counter(), time.process_time(), 0, 0

    def row(self, world_size: int, device: torch.device) -> dict[str, float]:
        elapsed = max(time.perf_counter() - self.t, 1e-9)
        row = {"perf/tokens_per_s": self.tokens * world_size / elapsed, "perf/steps_per_s": self.steps / elapsed,
               # CPU seconds of this process (all threads): on a busy machine, work done rather
               # than time spent waiting for a core.
               "perf/cpu_s": time.process_time() - self.cpu}
        if device.type == "cuda":
            row["perf/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
        return row


class EpochOrder:
    """The shuffled order of the current epoch (one permutation per epoch from the seed)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch, self.order = n, seed, -1, []

    def of(self, epoch: int) -> list[int]:
        if epoch != self.epoch:
            self.order, self.epoch = epoch_order(self.n, self.seed, epoch), epoch
        return self.order


def fit(cfg, model: torch.nn.Module, objective: Objective, train_set: Sequence, collate: Callable[[list], dict], *,
        out_dir, dist: DistInfo, eval_set: Optional[Sequence] = None, extra_state: Optional[dict] = None,
        desc: str = "train", trainable: Optional[torch.nn.Module] = None,
        eval_collate: Optional[Callable[[list], dict]] = None) -> LoopResult:
    """Train ``model`` on ``objective``. ``trainable`` is the module whose parameters the
    optimizer updates and whose state is checkpointed (default ``model``; pass the unwrapped
    module when ``model`` is a DDP wrapper). ``extra_state`` maps names to objects with
    state_dict/load_state_dict (e.g. a value head) saved in every checkpoint."""
    trainable = trainable or model
    per_epoch, total = plan_steps(cfg, len(train_set), dist.world_size)
    optimizer = make_optimizer(trainable, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    scheduler = make_scheduler(optimizer, total, cfg.warmup_steps, cfg.warmup_ratio, cfg.lr_schedule)
    B, A, W = cfg.batch_size, cfg.grad_accum, dist.world_size
    run = Run(cfg, out_dir, dist, desc=desc, total=total, model=trainable, optimizer=optimizer, scheduler=scheduler,
              extra=extra_state, position={"epoch": 0, "offset": 0}, global_batch=(B, A),
              plan={"training examples": len(train_set), "examples per global batch": B * A * W},
              plan_hint="Resume with the same --data, --eval-fraction, --batch-size, --grad-accum and number of "
                        "processes. ")
    if W > 1 and dist.is_main:
        print(f"prefalign {desc}: global batch {B * A * W} = --batch-size {B} x --grad-accum {A} x {W} processes",
              file=sys.stderr)
    if cfg.gradient_checkpointing and hasattr(trainable, "gradient_checkpointing_enable"):
        trainable.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    order, perf = EpochOrder(len(train_set), cfg.seed), Throughput()
    with run:
        pos = run.pos
        while run.step < total:
            if pos["offset"] >= per_epoch:
                pos["epoch"], pos["offset"] = pos["epoch"] + 1, 0
            mine = rank_batch_indices(order.of(pos["epoch"]), pos["offset"], B, A, dist.rank, W)
            micro = [collate([train_set[i] for i in mine[k * B:(k + 1) * B]]) for k in range(A)]
            loss_sum, units, step_metrics, tokens = backward_step(model, objective, micro, dist, cfg.dtype)
            grad_norm, finite = clip_and_check(trainable.parameters(), cfg.max_grad_norm)
            finite, signum = run.agree(finite and math.isfinite(loss_sum))
            if finite:
                optimizer.step()
                run.meter.add({"loss": (loss_sum, units / W), "grad_norm": (float(grad_norm) / W, 1.0 / W),
                               **step_metrics})
            optimizer.zero_grad(set_to_none=True)
            scheduler_step(scheduler)
            pos["offset"] += 1
            perf.tokens, perf.steps = perf.tokens + tokens, perf.steps + 1
            run.count_step(bad=0 if finite else 1)
            progress_row = {"epoch": pos["epoch"] + pos["offset"] / per_epoch, "lr": scheduler.get_last_lr()[0],
                            "bad_steps": pos["bad_steps"]}
            if run.too_many_bad_steps():
                run.log(progress_row)
            else:
                log_step(run, objective, perf, progress_row, eval_set and (model, eval_set, eval_collate or collate))
            run.end_step(signum)
    return run.result()


def log_step(run: Run, objective: Objective, perf: Throughput, progress_row: dict, evaluation) -> None:
    """The metrics.jsonl row of one step, when --logging-steps or --eval-steps say one is due:
    training means since the last row, perf/ rates, eval/ metrics (``evaluation`` = (model,
    eval set, collate) or falsy)."""
    cfg, step, row = run.cfg, run.step, {}
    if step % cfg.logging_steps == 0 or step == run.total:
        run.last = finalize(objective, run.reduce_metrics())
        row.update(run.last)
        row.update(progress_row)
        row.update(perf.row(run.dist.world_size, run.dist.device))
        perf.reset()
        run.bar.set_postfix(loss=f"{run.last.get('loss', float('nan')):.4f}")
    if evaluation and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == run.total):
        model, eval_set, collate = evaluation
        run.eval = evaluate(model, objective, eval_set, collate, cfg.batch_size, run.dist, cfg.dtype)
        row.update(run.eval)
    if row:
        run.log(row)
