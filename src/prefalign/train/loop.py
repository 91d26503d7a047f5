"""The one training loop every supervised stage uses (SFT, reward, DPO).

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
import signal
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence

import torch

from prefalign.errors import ConfigError, PrefalignError
from prefalign.train import checkpoint as ckpt
from prefalign.train.dist import DistInfo, all_gather_object, all_reduce_sum, barrier, no_grad_sync
from prefalign.train.logger import MetricsLogger, Stopwatch, progress
from prefalign.train.optim import clip_and_check, make_optimizer, make_scheduler


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar: SUM of per-unit losses over the micro-batch (carries grad)
    metrics: dict[str, tuple[Any, Any]] = field(default_factory=dict)  # name -> (sum, count), detached


class Objective(Protocol):
    def units(self, batch: dict) -> float: ...

    def __call__(self, model: torch.nn.Module, batch: dict) -> LossOutput: ...


class TrainingStopped(PrefalignError):
    """Raised after a signal or too many bad steps, once a checkpoint is safely written."""

    label = "stopped"  # not a usage error; the exit code (128 + signal, or 3) says why

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class LoopResult:
    steps: int
    last_metrics: dict[str, float]
    eval_metrics: dict[str, float]
    bad_steps: int
    wall_time_s: float
    resumed_from: Optional[int]


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


class _Meter:
    """Metric (sum, count) accumulators, reduced across ranks when read."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, metrics: dict[str, tuple[Any, Any]]) -> None:
        for k, (s, c) in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(s)
            self.counts[k] = self.counts.get(k, 0.0) + float(c)

    def _summed(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """Keys and [sums..., counts...] summed over ranks."""
        keys = sorted(self.sums)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # A rank that saw no examples (a short eval set) has no keys: agree on the union.
            keys = sorted(set().union(*all_gather_object(keys)))
        t = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.counts.get(k, 0.0) for k in keys],
                         dtype=torch.float64, device=device)
        return keys, all_reduce_sum(t) if keys else t

    def reduce(self, device: torch.device) -> dict[str, float]:
        keys, t = self._summed(device)
        n = len(keys)
        return {k: (t[i] / t[n + i]).item() if t[n + i] > 0 else float("nan") for i, k in enumerate(keys)}

    def global_state(self, device: torch.device) -> dict:
        """The sums of all ranks (for a checkpoint between two logged steps). Loaded by rank 0
        alone on resume, so nothing is lost or counted twice, whatever the new world size."""
        keys, t = self._summed(device)
        n = len(keys)
        return {"sums": {k: t[i].item() for i, k in enumerate(keys)},
                "counts": {k: t[n + i].item() for i, k in enumerate(keys)}}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load(self, s: dict) -> None:
        self.sums, self.counts = dict(s["sums"]), dict(s["counts"])


class _SignalFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops."""

    def __init__(self):
        self.signum: Optional[int] = None
        self._old = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self._old[sig] = signal.signal(sig, self._handle)
            except ValueError:  # not the main thread
                pass
        return self

    def _handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self._old.items():
            signal.signal(sig, old)


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
    meter = _Meter()
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


def agree(finite: bool, signum: Optional[int], dist: DistInfo) -> tuple[bool, int]:
    """The same (step is finite, signal received) on every rank: a rank that skips or stops
    alone would leave the others waiting in a collective."""
    if not dist.distributed:
        return finite, signum or 0
    t = torch.tensor([0.0 if finite else 1.0, float(signum or 0)], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t[0].item() == 0, int(t[1].item())


def _check_plan(path: Path, saved: Optional[dict], plan: dict) -> None:
    """The data position means nothing if the data set or the global batch changed."""
    if saved is not None and saved != plan:
        raise ConfigError(f"cannot resume from {path}: it was written with {saved['examples']} training examples "
                          f"and a global batch of {saved['global_batch']}, this run has {plan['examples']} and "
                          f"{plan['global_batch']}. Resume with the same --data, --eval-fraction, --batch-size, "
                          f"--grad-accum and number of processes, or start a new --output.")


def _apply_new_lr(lr: float, optimizer, scheduler) -> bool:
    """A --lr changed on resume takes effect (the checkpoint holds the old peak LR), so a run
    stopped by non-finite steps can continue with a lower one. True when it changed."""
    if all(base == lr for base in scheduler.base_lrs):
        return False
    print(f"prefalign: --lr {lr:g} replaces the checkpoint's {scheduler.base_lrs[0]:g}; "
          f"the count of skipped steps starts again.", file=sys.stderr)
    scheduler.base_lrs = [lr] * len(scheduler.base_lrs)
    for group, fn in zip(optimizer.param_groups, scheduler.lr_lambdas):
        group["initial_lr"], group["lr"] = lr, lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]
    return True


def _load_states(state: dict, trainable, optimizer, scheduler, extra_state: dict, dist: DistInfo) -> None:
    """Full model/optimizer state (broadcast from rank 0 under torchrun), scheduler and stage
    extras; a checkpoint of another model or stage is a ConfigError."""
    try:
        ckpt.load_train_state(trainable, optimizer, state["model"], state["optimizer"], dist)
        scheduler.load_state_dict(state["scheduler"])
        for k, v in extra_state.items():
            ckpt.load_extra(v, state["extra"][k], dist)
    except (RuntimeError, KeyError, ValueError) as e:
        raise ConfigError(f"cannot resume from {state['path']}: it does not match this run's model or stage "
                          f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Resume with the same "
                          f"--model and options, or start a new --output.") from None


def fit(cfg, model: torch.nn.Module, objective: Objective, train_set: Sequence, collate: Callable[[list], dict], *,
        out_dir, dist: DistInfo, eval_set: Optional[Sequence] = None, extra_state: Optional[dict] = None,
        desc: str = "train", trainable: Optional[torch.nn.Module] = None,
        eval_collate: Optional[Callable[[list], dict]] = None) -> LoopResult:
    """Train ``model`` on ``objective``. ``trainable`` is the module whose parameters the
    optimizer updates and whose state is checkpointed (default ``model``; pass the unwrapped
    module when ``model`` is a DDP wrapper). ``extra_state`` maps names to objects with
    state_dict/load_state_dict (e.g. a value head) saved in every checkpoint."""
    out_dir = Path(out_dir)
    trainable = trainable or model
    extra_state = extra_state or {}
    per_epoch, total = plan_steps(cfg, len(train_set), dist.world_size)
    optimizer = make_optimizer(trainable, cfg.lr, cfg.weight_decay, (cfg.adam_beta1, cfg.adam_beta2), cfg.adam_eps)
    scheduler = make_scheduler(optimizer, total, cfg.warmup_steps, cfg.warmup_ratio, cfg.lr_schedule)
    logger = MetricsLogger(out_dir, enabled=dist.is_main)
    pos = {"step": 0, "epoch": 0, "offset": 0, "bad_steps": 0}
    meter = _Meter()
    resumed_from = None
    B, A, W = cfg.batch_size, cfg.grad_accum, dist.world_size
    plan = {"examples": len(train_set), "global_batch": B * A * W}
    last_metrics: dict[str, float] = {}
    eval_metrics: dict[str, float] = {}
    if W > 1 and dist.is_main:
        print(f"prefalign {desc}: global batch {B * A * W} = --batch-size {B} x --grad-accum {A} x {W} processes",
              file=sys.stderr)

    state = ckpt.load_resume_state(out_dir, dist) if cfg.resume else None
    if cfg.resume and state is None:
        if dist.is_main:
            print(f"prefalign: --resume: no complete checkpoint in {out_dir / ckpt.CKPT_DIR}; "
                  f"starting from step 0.", file=sys.stderr)
        logger.truncate_after(0)  # rows a killed run logged without a checkpoint
    if state is not None:
        ckpt.check_global_batch(state, B, A, W, out_dir)
        _check_plan(Path(state["path"]), state.get("plan"), plan)
        _load_states(state, trainable, optimizer, scheduler, extra_state, dist)
        rngs = state.get("rng_ranks") or []
        # Per-rank streams continue exactly when the world size is unchanged.
        ckpt.set_rng_state(rngs[dist.rank] if len(rngs) == W else state["rng"], dist.device)
        pos.update(state["position"])
        if dist.is_main:  # the saved sums are already those of all ranks
            meter.load(state["meter"])
        logged = state.get("logged", {})
        last_metrics, eval_metrics = dict(logged.get("last", {})), dict(logged.get("eval", {}))
        if _apply_new_lr(cfg.lr, optimizer, scheduler):
            pos["bad_steps"] = 0  # a new --lr is a fresh try at the steps that failed
        resumed_from = pos["step"]
        logger.truncate_after(pos["step"])  # rows logged after the checkpoint are produced again
        if dist.is_main:
            print(f"prefalign: resumed from {state['path']} (step {pos['step']}).", file=sys.stderr)

    def save(step: int) -> None:
        """All ranks gather the state; rank 0 writes it; nobody leaves before it is on disk."""
        state = ckpt.checkpoint_state(trainable, optimizer, scheduler, pos, meter.global_state(dist.device),
                                      extra_state, dist, B * A * W)
        if dist.is_main:
            state.update(plan=plan, logged={"last": last_metrics, "eval": eval_metrics})
        ckpt.save_checkpoint_collective(out_dir, step, state, cfg.keep_checkpoints, dist)  # a refused write stops all

    if cfg.gradient_checkpointing and hasattr(trainable, "gradient_checkpointing_enable"):
        trainable.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    order: list[int] = []
    order_epoch = -1
    clock, window = Stopwatch(), {"t": time.perf_counter(), "cpu": time.process_time(), "tokens": 0, "steps": 0}
    bar = progress(total, desc, initial=pos["step"], enabled=cfg.progress and dist.is_main)
    with _SignalFlag() as stop, bar:
        while pos["step"] < total:
            if pos["offset"] >= per_epoch:
                pos["epoch"] += 1
                pos["offset"] = 0
            if order_epoch != pos["epoch"]:
                order, order_epoch = epoch_order(len(train_set), cfg.seed, pos["epoch"]), pos["epoch"]
            mine = rank_batch_indices(order, pos["offset"], B, A, dist.rank, W)
            micro = [collate([train_set[i] for i in mine[k * B:(k + 1) * B]]) for k in range(A)]
            loss_sum, units, step_metrics, tokens = backward_step(model, objective, micro, dist, cfg.dtype)
            window["tokens"] += tokens
            grad_norm, finite = clip_and_check(trainable.parameters(), cfg.max_grad_norm)
            finite, signum = agree(finite and math.isfinite(loss_sum), stop.signum, dist)
            if finite:
                optimizer.step()
                meter.add({"loss": (loss_sum, units / W), "grad_norm": (float(grad_norm) / W, 1.0 / W),
                           **step_metrics})
            else:
                pos["bad_steps"] += 1
            optimizer.zero_grad(set_to_none=True)
            with warnings.catch_warnings():  # a skipped step still advances the schedule
                warnings.simplefilter("ignore", UserWarning)
                scheduler.step()
            pos["step"] += 1
            pos["offset"] += 1
            window["steps"] += 1
            bar.update(1)
            step = pos["step"]
            if not finite and pos["bad_steps"] > cfg.max_bad_steps:
                logger.log({"step": step, "epoch": pos["epoch"] + pos["offset"] / per_epoch,
                            "lr": scheduler.get_last_lr()[0], "bad_steps": pos["bad_steps"]})
                save(step)
                raise TrainingStopped(
                    f"stopped at step {step}: {pos['bad_steps']} steps had a non-finite loss or gradient "
                    f"(more than --max-bad-steps {cfg.max_bad_steps}); the weights were never updated by them. "
                    f"The last good state is checkpointed in {out_dir / ckpt.CKPT_DIR}. Lower --lr or check the "
                    f"data, then rerun with --resume.", exit_code=3)
            row: dict[str, Any] = {}
            if step % cfg.logging_steps == 0 or step == total:
                last_metrics = finalize(objective, meter.reduce(dist.device))
                meter = _Meter()
                elapsed = time.perf_counter() - window["t"]
                row.update(last_metrics)
                row.update({"epoch": pos["epoch"] + pos["offset"] / per_epoch, "lr": scheduler.get_last_lr()[0],
                            "bad_steps": pos["bad_steps"],
                            "perf/tokens_per_s": window["tokens"] * W / max(elapsed, 1e-9),
                            "perf/steps_per_s": window["steps"] / max(elapsed, 1e-9),
                            # CPU seconds of this process (all threads): on a busy machine, work done
                            # rather than time spent waiting for a core.
                            "perf/cpu_s": time.process_time() - window["cpu"]})
                if dist.device.type == "cuda":
                    row["perf/peak_gpu_mem_gb"] = torch.cuda.max_memory_allocated(dist.device) / 1e9
                window = {"t": time.perf_counter(), "cpu": time.process_time(), "tokens": 0, "steps": 0}
                bar.set_postfix(loss=f"{last_metrics.get('loss', float('nan')):.4f}")
            if eval_set and ((cfg.eval_steps and step % cfg.eval_steps == 0) or step == total):
                eval_metrics = evaluate(model, objective, eval_set, eval_collate or collate, B, dist, cfg.dtype)
                row.update(eval_metrics)
            if row:
                logger.log({"step": step, **row})
            # The last step is checkpointed too, so a kill during the final save loses no training.
            if (cfg.save_steps and (step % cfg.save_steps == 0 or step == total)) or signum:
                save(step)
            if signum and step < total:
                name = signal.Signals(signum).name
                raise TrainingStopped(f"{name} received: saved a checkpoint at step {step} in "
                                      f"{out_dir / ckpt.CKPT_DIR}; rerun with --resume to continue.",
                                      exit_code=128 + signum)
    return LoopResult(steps=pos["step"], last_metrics=last_metrics, eval_metrics=eval_metrics,
                      bad_steps=pos["bad_steps"], wall_time_s=clock.elapsed(), resumed_from=resumed_from)
