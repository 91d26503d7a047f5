"""What every training stage does around the loop: output directory rules, distributed set-up,
seeding, held-out split, the final save and summary.json."""
from __future__ import annotations

import functools
import os
import random
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch

from prefalign.config import require, to_dict
from prefalign.errors import ConfigError, PrefalignError
from prefalign.train import checkpoint as ckpt
from prefalign.train import diskio
from prefalign.train.dist import DistInfo, broadcast_object, init_distributed, is_fsdp
from prefalign.train.logger import write_summary


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def check_output(cfg) -> Path:
    """OUTPUT must be new, empty, or resumable. Nothing is created here: bad input found later
    must not leave a half-written directory behind."""
    out = Path(cfg.output)
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--output {out} exists and is not a directory.")
    if out.exists() and any(out.iterdir()) and not getattr(cfg, "resume", False):
        if (out / ckpt.CKPT_DIR).exists() or (out / "metrics.jsonl").exists():
            raise ConfigError(f"--output {out} already holds a run (checkpoints or metrics.jsonl). "
                              f"Pass --resume to continue it, or choose a new directory.")
    parent = next((p for p in [out, *out.absolute().parents] if p.exists()), None)
    if parent is not None and not os.access(parent, os.W_OK | os.X_OK):
        raise ConfigError(f"--output {out}: {parent} is not writable; choose a directory you can write to.")
    diskio.start_run(out)
    return out


def start(cfg, *required: str) -> tuple[DistInfo, Path, float]:
    require(cfg, *required)
    out = check_output(cfg)
    dist = init_distributed(getattr(cfg, "device", "auto"))
    seed_everything(cfg.seed)
    return dist, out, time.perf_counter()


def split_eval(examples: list, eval_examples: Optional[list], fraction: float, seed: int) -> tuple[list, list]:
    """--eval-data wins; else hold out a seeded --eval-fraction of the training examples."""
    if eval_examples is not None or fraction <= 0:
        return examples, eval_examples or []
    if not 0 < fraction < 1:
        raise ConfigError(f"--eval-fraction must be between 0 and 1, got {fraction}.")
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed + 17)).tolist()
    n_eval = max(1, int(round(fraction * len(examples))))
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [examples[i] for i in sorted(held)]


def save_final(out: Path, dist: DistInfo, save_fn: Callable[[Path], None], needed: diskio.Needed = None) -> None:
    """Write the final model into a temporary folder, fsync it, then move its files into OUTPUT
    with config.json last: a folder with config.json holds a whole model, and summary.json
    (written after this) marks a finished run. A kill before that leaves the last checkpoint
    to --resume from; a stale temporary folder is removed by the next save. A write the disk
    refuses removes the temporary folder and raises a DiskError (``needed``: the bytes the model
    takes, for its message) on every rank, so all ranks stop together."""
    error = None
    if dist.is_main:
        try:
            _write_final(out, save_fn, needed)
        except PrefalignError as e:
            error = e
    error = broadcast_object(error)  # also the barrier: nobody leaves before the model is on disk
    if error is not None:
        raise error


def _write_final(out: Path, save_fn: Callable[[Path], None], needed: diskio.Needed) -> None:
    then = functools.partial(ckpt.resume_hint, out)
    diskio.output_dir(out, then=then)
    tmp = out / ".final-tmp"
    with diskio.guarded(tmp, needed, then, cleanup=[tmp], what=f"the final model into {out}"):
        if tmp.exists():
            shutil.rmtree(tmp)
        save_fn(tmp)
        files = sorted((f for f in tmp.rglob("*") if f.is_file()), key=lambda f: f.name == "config.json")
        for f in files:
            diskio.fsync_path(f)
        for f in files:
            dest = out / f.relative_to(tmp)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(f, dest)
        shutil.rmtree(tmp)
        diskio.fsync_path(out)


def save_model_final(out: Path, dist: DistInfo, model, tokenizer, base: Optional[str] = None,
                     merge: bool = True) -> dict:
    """The trained model in HF format in OUTPUT (see save_final). Under FSDP every rank helps
    gather the full weights, which rank 0 then writes; otherwise rank 0 saves its replica.
    ``model`` is the unwrapped module (not the DDP wrapper). A LoRA model also writes its adapter
    (OUTPUT/adapter, PEFT format, recording ``base`` as its base model); ``merge=False``
    (--no-merge-lora) writes the adapter and tokenizer only. Returns summary.json's entries about
    it (``lora``; {} without LoRA)."""
    from prefalign.models import lora_summary, save_pretrained
    state = ckpt.full_model_state(model, dist) if is_fsdp(model) else None
    save_final(out, dist, lambda d: save_pretrained(model, tokenizer, d, state_dict=state, merge=merge,
                                                    adapter_base=base),
               needed=lambda: ckpt.nbytes(state if state is not None else model.state_dict()))
    return lora_summary(model, base, merge)


def finish(cfg, out: Path, dist: DistInfo, stage: str, t0: float, result=None, **extra: Any) -> dict:
    summary = {"stage": stage, "config": to_dict(cfg), "wall_time_s": time.perf_counter() - t0,
               "world_size": dist.world_size,
               "global_batch_size": cfg.batch_size * cfg.grad_accum * dist.world_size if hasattr(cfg, "grad_accum") else None}
    if result is not None:
        summary.update({"steps": result.steps, "final_metrics": result.last_metrics,
                        "eval_metrics": result.eval_metrics, "bad_steps": result.bad_steps,
                        "resumed_from_step": result.resumed_from})
    summary.update(extra)
    if dist.is_main:
        write_summary(out, summary)
    return summary


def report(summary: dict, keys: Sequence[str]) -> None:
    """One line a person reads at the end of a stage."""
    m = {**summary.get("final_metrics", {}), **summary.get("eval_metrics", {})}
    parts = [f"{k}={m[k]:.4g}" for k in keys if k in m and isinstance(m[k], float)]
    print(f"prefalign {summary['stage']}: {summary.get('steps', 0)} steps in {summary['wall_time_s']:.1f}s; "
          + " ".join(parts))
