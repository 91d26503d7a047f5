"""The run harness: what every training loop shares, offline (``fit``) or online (PPO and the
critic-free methods), so that a guarantee proven once holds for all of them.

A loop is a recipe over one ``Run``:

    run = Run(cfg, out_dir, dist, desc="ppo", unit="iteration", total=T, plan={...},
              model=trainable, optimizer=optimizer, scheduler=scheduler,
              extra={"kl_ctl": kl_ctl}, generators={"sample": g})
    with run:                                  # resume (--resume), progress bar, SIGTERM/SIGINT
        while run.step < run.total:
            ... one step: batches, losses, optimizer steps; metrics into run.meter ...
            finite, signum = run.agree(finite)  # the same decision on every rank
            run.count_step(bad=0 if finite else 1)
            run.log(row)                        # metrics.jsonl (and its tracker hooks)
            run.end_step(signum)                # checkpoint when due; stop on a signal or bad steps
    result = run.result()

What the harness owns:
- resume from the newest complete checkpoint, refusing one written for another plan (data set,
  global batch, processes) or another model; a changed --lr takes effect;
- atomic saves (train/checkpoint.py) of model and optimizer (full, name-keyed state whatever the
  sharding; frozen parameters, e.g. a LoRA run's base weights, are left out and reloaded from
  --model on resume, checked by a sha256 of them), scheduler, stage extras (objects with
  state_dict/load_state_dict), every rank's RNG streams and named torch.Generators, the data
  position, metric sums not yet logged;
- SIGTERM/SIGINT: a checkpoint after the current step, then ``TrainingStopped`` (exit 128 + signal);
- bad-step accounting: more than --max-bad-steps skipped steps saves the last good state and stops
  (exit 3);
- metrics.jsonl (and other JSONL logs, e.g. samples.jsonl), truncated on resume to the checkpoint,
  every row also sent to the trackers of --report-to, and the progress bar with ETA.
"""
from __future__ import annotations

import hashlib
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch

from prefalign.errors import ConfigError, PrefalignError
from prefalign.train import checkpoint as ckpt
from prefalign.train.dist import DistInfo, all_gather_object, all_reduce_sum
from prefalign.train.logger import MetricsLogger, progress
from prefalign.train.trackers import open_trackers


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


class Meter:
    """Metric (sum, count) accumulators, reduced across ranks when read."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.counts: dict[str, float] = {}

    def add(self, metrics: dict[str, tuple[Any, Any]]) -> None:
        for k, (s, c) in metrics.items():
            self.sums[k] = self.sums.get(k, 0.0) + float(s)
            self.counts[k] = self.counts.get(k, 0.0) + float(c)

    def summed(self, device: torch.device) -> tuple[list[str], torch.Tensor]:
        """Keys and [sums..., counts...] summed over ranks."""
        keys = sorted(self.sums)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # A rank that saw no examples (a short eval set) has no keys: agree on the union.
            keys = sorted(set().union(*all_gather_object(keys)))
        t = torch.tensor([self.sums.get(k, 0.0) for k in keys] + [self.counts.get(k, 0.0) for k in keys],
                         dtype=torch.float64, device=device)
        return keys, all_reduce_sum(t) if keys else t

    def reduce(self, device: torch.device) -> dict[str, float]:
        keys, t = self.summed(device)
        n = len(keys)
        return {k: (t[i] / t[n + i]).item() if t[n + i] > 0 else float("nan") for i, k in enumerate(keys)}

    def global_state(self, device: torch.device) -> dict:
        """The sums of all ranks (for a checkpoint between two logged steps). Loaded by rank 0
        alone on resume, so nothing is lost or counted twice, whatever the new world size."""
        keys, t = self.summed(device)
        n = len(keys)
        return {"sums": {k: t[i].item() for i, k in enumerate(keys)},
                "counts": {k: t[n + i].item() for i, k in enumerate(keys)}}

    def state(self) -> dict:
        return {"sums": dict(self.sums), "counts": dict(self.counts)}

    def load(self, s: dict) -> None:
        self.sums, self.counts = dict(s["sums"]), dict(s["counts"])


class SignalFlag:
    """SIGTERM/SIGINT set a flag; the loop saves a checkpoint after the current step and stops.
    A second signal stops at once (KeyboardInterrupt)."""

    def __init__(self):
        self.signum: Optional[int] = None
        self.previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            try:
                self.previous[sig] = signal.signal(sig, self.handle)
            except ValueError:  # not the main thread
                pass
        return self

    def handle(self, signum, frame):
        if self.signum is not None:  # second signal: stop now
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc):
        for sig, old in self.previous.items():
            signal.signal(sig, old)


def agree(finite: bool, signum: Optional[int], dist: DistInfo) -> tuple[bool, int]:
    """The same (step is finite, signal received) on every rank: a rank that skips or stops
    alone would leave the others waiting in a collective."""
    if not dist.distributed:
        return finite, signum or 0
    t = torch.tensor([0.0 if finite else 1.0, float(signum or 0)], dtype=torch.float64, device=dist.device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return t[0].item() == 0, int(t[1].item())


def apply_new_lr(requested: Sequence[float], optimizer, scheduler) -> bool:
    """A --lr (or --value-lr) changed on resume takes effect (the checkpoint holds the old peak
    LRs), so a run stopped by non-finite steps can continue with a lower one. ``requested`` is this
    run's peak LR per parameter group. True when one changed."""
    saved = list(scheduler.base_lrs)
    if saved == list(requested):
        return False
    show = lambda lrs: f"{lrs[0]:g}" if len(set(lrs)) == 1 else "/".join(f"{lr:g}" for lr in lrs)
    print(f"prefalign: learning rate {show(list(requested))} (--lr, --value-lr; per parameter group) replaces "
          f"the checkpoint's {show(saved)}; "
          f"the count of skipped steps starts again.", file=sys.stderr)
    scheduler.base_lrs = list(requested)
    for group, fn, lr in zip(optimizer.param_groups, scheduler.lr_lambdas, requested):
        group["initial_lr"], group["lr"] = lr, lr * fn(scheduler.last_epoch)
    scheduler._last_lr = [group["lr"] for group in optimizer.param_groups]  # torch's own cache of get_last_lr()
    return True


# Checkpoints written by the run harness; earlier ones (before it) are refused with a clear message.
CHECKPOINT_FORMAT = 2


class Run:
    """One training run's bookkeeping (see the module docstring for the loop it serves).

    ``plan`` describes what the saved data position means, as {what: number}, e.g.
    {"training examples": 24, "examples per global batch": 8}:
    a checkpoint written for another plan is refused, with ``plan_hint`` telling what to keep.
    ``global_batch`` = (batch size, grad accumulation) adds the clearer global-batch message of
    checkpoint.check_global_batch. ``pre_save(step)`` runs on every rank before each save (a collective
    check, e.g. that hand-made data-parallel replicas stayed identical). ``logs`` are the JSONL
    files besides metrics.jsonl that resume truncates to the checkpoint (e.g. samples.jsonl).
    """

    def __init__(self, cfg, out_dir, dist: DistInfo, *, desc: str, total: int, plan: dict, model: torch.nn.Module,
                 optimizer, scheduler, unit: str = "step", extra: Optional[dict] = None,
                 generators: Optional[dict[str, torch.Generator]] = None, position: Optional[dict] = None,
                 global_batch: Optional[tuple[int, int]] = None, plan_hint: str = "",
                 pre_save: Optional[Callable[[int], None]] = None, logs: Sequence[str] = ()):
        self.cfg, self.out, self.dist = cfg, Path(out_dir), dist
        self.desc, self.total, self.unit, self.plan, self.plan_hint = desc, total, unit, plan, plan_hint
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        self.extra, self.generators = extra or {}, generators or {}
        self.global_batch, self.pre_save = global_batch, pre_save
        self.requested_lrs = list(scheduler.base_lrs)  # before a checkpoint's scheduler state replaces them
        self.pos: dict[str, Any] = {"step": 0, "bad_steps": 0, **(position or {})}
        self.meter = Meter()
        self.last: dict[str, float] = {}   # the newest logged metrics (summary.json's final_metrics)
        self.eval: dict[str, float] = {}   # the newest eval/ metrics
        # Every metrics.jsonl row also goes to the trackers of --report-to (rank 0 only).
        self.logs = {"metrics.jsonl": MetricsLogger(self.out, dist.is_main,
                                                    trackers=open_trackers(cfg, self.out, dist.is_main)),
                     **{name: MetricsLogger(self.out, dist.is_main, name) for name in logs}}
        self.resumed_from: Optional[int] = None
        self.bad_this_step = 0
        self.signals = SignalFlag()
        self.bar = None
        self.clock = time.perf_counter()
        self._frozen: Optional[dict] = None  # frozen_weights(), computed once

    # ----------------------------------------------------------------- the loop's frame

    @property
    def step(self) -> int:
        return self.pos["step"]

    def __enter__(self) -> "Run":
        self.resume()
        self.signals.__enter__()
        self.bar = progress(self.total, self.desc, initial=self.step, unit=self.unit,
                            enabled=self.cfg.progress and self.dist.is_main)
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()
        self.signals.__exit__(*exc)

    def agree(self, finite: bool = True) -> tuple[bool, int]:
        """(finite on every rank, the signal any rank received or 0)."""
        return agree(finite, self.signals.signum, self.dist)

    def count_step(self, bad: int = 0) -> None:
        """One step of the loop is done; ``bad`` optimizer steps in it were skipped."""
        self.pos["step"] += 1
        self.pos["bad_steps"] += bad
        self.bad_this_step = bad
        self.bar.update(1)

    def too_many_bad_steps(self) -> bool:
        """This step skipped an update and the run has now skipped more than --max-bad-steps."""
        return bool(self.bad_this_step) and self.pos["bad_steps"] > self.cfg.max_bad_steps

    def reduce_metrics(self) -> dict[str, float]:
        """The means of run.meter over all ranks since the last call; the meter starts again."""
        metrics = self.meter.reduce(self.dist.device)
        self.meter = Meter()
        return metrics

    def log(self, row: dict[str, Any], to: str = "metrics.jsonl") -> None:
        """Append ``{"step": run.step, **row}`` to OUTPUT/<to> (rank 0 only)."""
        self.logs[to].log({"step": self.step, **row})

    def end_step(self, signum: int = 0) -> None:
        """Checkpoint when due (every --save-steps, the last step, a signal, too many bad steps),
        then stop when a signal came or too many steps were bad. The last step is checkpointed
        too, so a kill during the final save loses no training."""
        step, cfg = self.step, self.cfg
        bad = self.too_many_bad_steps()
        if bad or signum or (cfg.save_steps and (step % cfg.save_steps == 0 or step == self.total)):
            self.save()
        where = self.out / ckpt.CKPT_DIR
        if bad:
            raise TrainingStopped(
                f"stopped at {self.unit} {step}: {self.pos['bad_steps']} steps had a non-finite loss or gradient "
                f"(more than --max-bad-steps {cfg.max_bad_steps}); the weights were never updated by them. The "
                f"last good state is checkpointed in {where}. Lower --lr or check the data, then rerun with "
                f"--resume.", exit_code=3)
        if signum and step < self.total:
            raise TrainingStopped(f"{signal.Signals(signum).name} received: saved a checkpoint at {self.unit} "
                                  f"{step} in {where}; rerun with --resume to continue.", exit_code=128 + signum)

    def result(self) -> LoopResult:
        return LoopResult(steps=self.step, last_metrics=self.last, eval_metrics=self.eval,
                          bad_steps=self.pos["bad_steps"], wall_time_s=time.perf_counter() - self.clock,
                          resumed_from=self.resumed_from)

    # ----------------------------------------------------------------- save and resume

    def save(self) -> None:
        """All ranks gather the state; rank 0 writes it; nobody leaves before it is on disk."""
        if self.pre_save is not None:
            self.pre_save(self.step)
        dist = self.dist
        model_sd, optim_sd = ckpt.full_train_state(self.model, self.optimizer, dist)
        frozen = self.frozen_weights()
        if frozen is not None and model_sd is not None:  # reloaded from --model on resume
            model_sd = {k: v for k, v in model_sd.items() if k not in frozen["names"]}
        streams = all_gather_object({"rng": ckpt.rng_state(dist.device),
                                     "generators": {k: g.get_state() for k, g in self.generators.items()}})
        extra = {k: ckpt.extra_state_of(v, dist) for k, v in self.extra.items()}
        meter = self.meter.global_state(dist.device)
        if dist.is_main:
            state = {"format": CHECKPOINT_FORMAT, "model": model_sd, "optimizer": optim_sd, "scheduler": self.scheduler.state_dict(),
                     "rng": streams[0]["rng"], "rng_ranks": [s["rng"] for s in streams],
                     "generators": [s["generators"] for s in streams], "position": dict(self.pos), "meter": meter,
                     "extra": extra, "plan": self.plan, "logged": {"last": self.last, "eval": self.eval},
                     "world_size": dist.world_size}
            if frozen is not None:
                state["frozen"] = {"parameters": len(frozen["names"]), "sha256": frozen["sha256"]}
            if self.global_batch is not None:
                state["global_batch"] = self.global_batch[0] * self.global_batch[1] * dist.world_size
        else:
            state = None
        # rank 0 writes; a refused write (full disk, vanished output) stops every rank alike
        ckpt.save_checkpoint_collective(self.out, self.step, state, self.cfg.keep_checkpoints, dist)

    def resume(self) -> None:
        """Load the newest complete checkpoint when --resume; drop log rows written after it."""
        dist = self.dist
        state = ckpt.load_resume_state(self.out, dist) if self.cfg.resume else None
        if self.cfg.resume and state is None:
            if dist.is_main:
                print(f"prefalign: --resume: no complete checkpoint in {self.out / ckpt.CKPT_DIR}; "
                      f"starting from {self.unit} 0.", file=sys.stderr)
            self.truncate_logs(0)  # rows a killed run logged without a checkpoint
        if state is None:
            return
        if state.get("format") != CHECKPOINT_FORMAT:
            raise ConfigError(f"cannot resume from {state['path']}: it was written by an earlier prefalign (before "
                              f"the run harness), whose checkpoints this version does not read. Start a new --output, "
                              f"or finish that run with the prefalign version that started it.")
        self.check_plan(state)
        self.load_states(state)
        mine = dist.rank if len(state["rng_ranks"]) == dist.world_size else 0
        # Per-rank streams continue exactly when the world size is unchanged.
        ckpt.set_rng_state(state["rng_ranks"][mine], dist.device)
        for name, g in self.generators.items():
            g.set_state(state["generators"][mine][name])
        self.pos.update(state["position"])
        if dist.is_main:  # the saved sums are already those of all ranks
            self.meter.load(state["meter"])
        self.last, self.eval = dict(state["logged"]["last"]), dict(state["logged"]["eval"])
        if apply_new_lr(self.requested_lrs, self.optimizer, self.scheduler):
            self.pos["bad_steps"] = 0  # a new --lr is a fresh try at the steps that failed
        self.resumed_from = self.step
        self.truncate_logs(self.step)  # rows logged after the checkpoint are produced again
        if dist.is_main:
            print(f"prefalign: resumed from {state['path']} ({self.unit} {self.step}).", file=sys.stderr)

    def truncate_logs(self, step: int) -> None:
        for logger in self.logs.values():
            logger.truncate_after(step)

    def check_plan(self, state: dict) -> None:
        """The data position means nothing if the data set or the global batch changed."""
        if self.global_batch is not None:
            ckpt.check_global_batch(state, *self.global_batch, self.dist.world_size, self.out)
        saved = state.get("plan")
        if saved != self.plan:
            describe = lambda plan: ", ".join(f"{v} {k}" for k, v in (plan or {}).items())
            raise ConfigError(f"cannot resume from {state['path']}: it was written with {describe(saved)}; this run "
                              f"has {describe(self.plan)}. {self.plan_hint}Otherwise start a new --output.")

    def frozen_weights(self) -> Optional[dict]:
        """{"names", "sha256"} of the parameters that never train (requires_grad off: a LoRA run's
        base weights), or None when every parameter trains. Checkpoints leave them out."""
        if self._frozen is None:
            named = [(n, p) for n, p in self.model.named_parameters(remove_duplicate=False) if not p.requires_grad]
            h = hashlib.sha256()
            for name, p in named:
                t = p.detach().contiguous().reshape(-1)
                h.update(f"{name}:{t.dtype}:{tuple(p.shape)};".encode())
                h.update(memoryview(t.view(torch.uint8).cpu().numpy()))
            self._frozen = {"names": {n for n, _ in named}, "sha256": h.hexdigest()}
        return self._frozen if self._frozen["names"] else None

    def with_frozen_weights(self, state: dict) -> Optional[dict]:
        """The checkpoint's model state with the frozen parameters it left out taken from this run's
        model (loaded from --model), after checking they are the ones it was trained on."""
        model_sd, saved = state["model"], state.get("frozen")
        if saved is None:
            return model_sd
        mine = self.frozen_weights()
        if mine is None or mine["sha256"] != saved["sha256"]:
            raise ConfigError(f"cannot resume from {state['path']}: its {saved['parameters']} frozen parameters (the "
                              f"base weights of a LoRA run) are not this run's; resume with the same --model and "
                              f"LoRA options, or start a new --output.")
        if model_sd is None:  # ranks other than 0: rank 0 broadcasts
            return None
        own = self.model.state_dict()
        return {**{k: own[k] for k in mine["names"] if k in own}, **model_sd}

    def load_states(self, state: dict) -> None:
        """Full model/optimizer state (broadcast from rank 0 under torchrun), scheduler and stage
        extras; a checkpoint of another model or stage is a ConfigError."""
        model_sd = self.with_frozen_weights(state)
        try:
            ckpt.load_train_state(self.model, self.optimizer, model_sd, state["optimizer"], self.dist)
            self.scheduler.load_state_dict(state["scheduler"])
            for k, v in self.extra.items():
                ckpt.load_extra(v, state["extra"][k], self.dist)
        except (RuntimeError, KeyError, ValueError) as e:
            raise ConfigError(f"cannot resume from {state['path']}: it does not match this run's model or stage "
                              f"({type(e).__name__}: {str(e).splitlines()[0][:300]}). Resume with the same "
                              f"--model and options, or start a new --output.") from None
