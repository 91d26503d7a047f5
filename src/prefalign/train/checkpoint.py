"""Atomic checkpoints and exact resume.

A checkpoint is a directory OUTPUT/checkpoints/step-000123 holding `state.pt` (model,
optimizer, scheduler, RNG states, data position, stage extras) and `COMPLETE` (the step, the
byte size and the sha256 of state.pt). It is written under a temporary name, fsynced, then
renamed, so a kill during a save leaves the previous checkpoint intact. Old checkpoints are
pruned only after the new one is complete. `--resume` takes the newest directory that is
complete and loads; a partial, truncated or bit-flipped one is reported and skipped, never
loaded half. A save the disk refuses (full, read-only, gone) removes its temporary folder and
raises a DiskError that says which checkpoint --resume will continue from (train/diskio.py).

Model and optimizer state are always FULL (unsharded) and keyed by parameter name, whatever
wrote them (one process, DDP, FSDP2), so a checkpoint written by N processes loads in M. Under
FSDP2 every rank takes part in gathering it (rank 0 alone receives and writes it) and, on
resume, rank 0 reads the file and broadcasts each tensor; the other ranks never touch it.
"""
from __future__ import annotations

import os
import random
import shutil
import sys
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from prefalign.errors import ConfigError, InternalError, PrefalignError
from prefalign.train import diskio
from prefalign.train.dist import broadcast_object, is_fsdp

CKPT_DIR = "checkpoints"
MARKER = "COMPLETE"
STATE = "state.pt"
REQUIRED_KEYS = ("model", "optimizer", "scheduler", "rng", "position")


def rng_state(device: Optional[torch.device] = None) -> dict[str, Any]:
    """Python, NumPy and torch CPU states, plus the state of the GPU this process trains on.

    Only that GPU's state: under torchrun rank 0 writes the checkpoint, and its view of the
    other GPUs' generators is stale (each rank advances its own). Ranks are seeded alike and
    draw alike, so rank 0's own state is every rank's state.
    """
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    cuda = _cuda_device(device)
    if cuda is not None:
        state["cuda"] = torch.cuda.get_rng_state(cuda)
    return state


def set_rng_state(state: dict[str, Any], device: Optional[torch.device] = None) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    cuda = _cuda_device(device)
    if "cuda" in state and cuda is not None:
        if isinstance(state["cuda"], (list, tuple)):  # older checkpoints: every visible GPU
            torch.cuda.set_rng_state_all(state["cuda"])
        else:
            torch.cuda.set_rng_state(state["cuda"], cuda)


def _cuda_device(device: Optional[torch.device]) -> Optional[torch.device]:
    """The GPU whose generator matters: ``device`` when it is a GPU, else the current one."""
    if not torch.cuda.is_available():
        return None
    if device is not None and torch.device(device).type != "cuda":
        return None
    if device is None or torch.device(device).index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(device)


def _full_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions
    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module, info) -> Optional[dict[str, Any]]:
    """The whole model's state dict on CPU on rank 0 (None on other ranks). A collective under
    torchrun: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict
    sd = get_model_state_dict(model, options=_full_options(cpu_offload=True))
    return sd if info.is_main else None


def full_train_state(model: torch.nn.Module, optimizer, info) -> tuple[Optional[dict], Optional[dict]]:
    """(model state, optimizer state), full and name-keyed, on rank 0; (None, None) elsewhere."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    model_sd = full_model_state(model, info)
    optim_sd = get_optimizer_state_dict(model, optimizer, options=_full_options(cpu_offload=True))
    return (model_sd, optim_sd) if info.is_main else (None, None)


def load_train_state(model: torch.nn.Module, optimizer, model_sd: Optional[dict], optim_sd: Optional[dict],
                     info) -> None:
    """Load full states into a (possibly sharded) model and its optimizer. Under torchrun only
    rank 0 needs them (others pass None): rank 0 broadcasts and each rank keeps its shard."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict
    opts = _full_options(broadcast_from_rank0=info.distributed)
    # Model and optimizer in two calls: the combined set_state_dict deadlocked with
    # broadcast_from_rank0 on gloo (torch 2.13) when other ranks passed empty dicts.
    set_model_state_dict(model, model_sd or {}, options=opts)
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, optim_sd or {}, options=opts)


def _remove(path: Path) -> None:
    """Rename away first (atomic), then delete: a kill mid-delete never leaves a half
    checkpoint under a step-* name that looks complete."""
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def nbytes(obj) -> int:
    """Bytes of the tensors in a (nested) state: about what torch.save of it writes."""
    if torch.is_tensor(obj):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(nbytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(nbytes(v) for v in obj)
    return 0


def resume_hint(out_dir) -> str:
    """What --resume will do now: the end of the message of a write that failed under a run."""
    if not Path(out_dir).is_dir():  # gone: what it held is unknown here
        return f"rerun with --resume: it continues from the last complete checkpoint in {out_dir}"
    root = Path(out_dir) / CKPT_DIR
    done = sorted(p for p in root.glob("step-*") if is_complete(p)) if root.is_dir() else []
    if done:
        return f"rerun with --resume: it continues from the last complete checkpoint, {done[-1]}, which is intact"
    return ("rerun with --resume (no checkpoint is complete yet, so the run starts again from step 0; "
            "--save-steps N keeps one every N steps)")


def save_checkpoint(out_dir, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write OUTPUT/checkpoints/step-N atomically, then prune to the newest ``keep`` (0: keep all).
    A failed write leaves no temporary folder and raises a DiskError; the older checkpoints stay."""
    root = diskio.output_dir(out_dir, then=lambda: resume_hint(out_dir)) / CKPT_DIR
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    with diskio.guarded(final, needed=lambda: nbytes(state), then=lambda: resume_hint(out_dir), cleanup=[tmp]):
        root.mkdir(exist_ok=True)
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir()
        size, digest = diskio.write_stream(tmp / STATE, lambda f: torch.save(state, f))
        diskio.write_stream(tmp / MARKER, lambda f: f.write(f"{step} {size} {digest}\n".encode()))
        diskio.fsync_path(tmp)
        if final.exists():
            _remove(final)
        os.replace(tmp, final)
        diskio.fsync_path(root)
        prune(root, keep)
    return final


def save_checkpoint_collective(out_dir, step: int, state: Optional[dict[str, Any]], keep: int, dist) -> None:
    """save_checkpoint under torchrun: every rank calls it, rank 0 writes ``state`` (None elsewhere).
    Every rank returns once the checkpoint is on disk, or raises the error rank 0 met, so a save the
    disk refuses stops all ranks together with one message."""
    error = None
    if dist.is_main:
        try:
            save_checkpoint(out_dir, step, state, keep)
        except PrefalignError as e:
            error = e
        except Exception as e:  # any other failure must not leave the other ranks waiting
            error = InternalError(f"writing checkpoint step {step} in {out_dir} failed ({type(e).__name__}: {e}). "
                                  f"The last complete checkpoint is untouched; this is a bug in prefalign, please "
                                  f"report it with the command line.")
    error = broadcast_object(error)
    if error is not None:
        raise error


def is_complete(path: Path) -> bool:
    return (path / MARKER).is_file()


def prune(root: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints, and leftovers of killed saves."""
    done = sorted(p for p in root.glob("step-*") if is_complete(p))
    for old in done[:-keep] if keep > 0 else []:
        _remove(old)
    for stale in list(root.glob(".tmp-step-*")) + list(root.glob(".del-step-*")):
        shutil.rmtree(stale, ignore_errors=True)


def _check(path: Path) -> Optional[str]:
    """Why the checkpoint at ``path`` cannot be used, judged from its files; None if it looks whole.
    Markers of older versions hold no checksum: only their size is checked."""
    if not is_complete(path):
        return f"no {MARKER} marker (the save was interrupted)"
    if not (path / STATE).is_file():
        return f"{STATE} is missing"
    fields = (path / MARKER).read_text(errors="replace").split()
    size = (path / STATE).stat().st_size
    if len(fields) >= 2 and fields[1].isdigit() and int(fields[1]) != size:
        return f"{STATE} has {size} bytes, {MARKER} says {fields[1]} (truncated or overwritten)"
    if len(fields) >= 3 and diskio.file_sha256(path / STATE) != fields[2]:
        return (f"{STATE} does not match the sha256 recorded in {MARKER} when it was written "
                f"(damaged on disk: a flipped bit, a bad sector or a partial overwrite)")
    return None


def load_latest(out_dir, map_location="cpu") -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest complete checkpoint that loads, or None. Broken ones are reported and skipped."""
    root = Path(out_dir) / CKPT_DIR
    if not root.exists():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        problem = _check(path)
        if problem is None:
            try:
                state = torch.load(path / STATE, map_location=map_location, weights_only=False)
            except Exception as e:  # a truncated or corrupt file must never be loaded half
                problem = f"{STATE} cannot be read ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})"
            else:
                missing = [k for k in REQUIRED_KEYS if not isinstance(state, dict) or k not in state]
                if not missing:
                    return path, state
                problem = f"{STATE} lacks {', '.join(missing)}"
        if os.environ.get("RANK", "0") == "0":  # under torchrun every rank may look: one report
            print(f"prefalign: skipping checkpoint {path}: {problem}.", file=sys.stderr)
    return None


def extra_state_of(obj, dist):
    """A stage extra's state: gathered in full for an FSDP-sharded module, else its state_dict()."""
    return full_model_state(obj, dist) if is_fsdp(obj) else obj.state_dict()


def load_extra(obj, sd, dist) -> None:
    if is_fsdp(obj):
        load_train_state(obj, None, sd, None, dist)
    else:
        obj.load_state_dict(sd)


def load_resume_state(out_dir, dist) -> Optional[dict]:
    """The newest checkpoint, read by rank 0 only. Other ranks get everything but the model and
    optimizer tensors (rank 0 broadcasts those while loading them), or None on every rank."""
    found = load_latest(out_dir) if dist.is_main else None
    state = found[1] if found is not None else None
    if state is not None:
        state["path"] = str(found[0])
    small = {k: v for k, v in state.items() if k not in ("model", "optimizer")} if state is not None else None
    small = broadcast_object(small)
    if small is None:
        return None
    return {**small, "model": state["model"] if state else None, "optimizer": state["optimizer"] if state else None}


def check_global_batch(state: dict, batch_size: int, grad_accum: int, world_size: int, out_dir) -> None:
    """Resuming must keep the global batch: the data position counts global batches, and a
    different one changes what every later step trains on."""
    saved, now = state.get("global_batch"), batch_size * grad_accum * world_size
    if saved is None or saved == now:
        return
    fix = f"--batch-size x --grad-accum x number of processes = {saved}"
    per_process = grad_accum * world_size
    if saved % per_process == 0:
        fix += (f": with {world_size} process(es) and --grad-accum {grad_accum}, "
                f"use --batch-size {saved // per_process}")
    raise ConfigError(
        f"the checkpoint {state.get('path', out_dir)} was written with a global batch of {saved} examples "
        f"({state.get('world_size', 1)} process(es)); this run's is {now} (--batch-size {batch_size} x "
        f"--grad-accum {grad_accum} x {world_size} process(es)). To resume, keep {fix}.")
