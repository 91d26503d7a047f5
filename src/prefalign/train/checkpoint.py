"""Atomic checkpoints and exact resume.

A checkpoint is a directory OUTPUT/checkpoints/step-000123 holding `state.pt` (model,
optimizer, scheduler, RNG states, data position, stage extras) and `COMPLETE` (the step and
the byte size of state.pt). It is written under a temporary name, fsynced, then renamed, so a
kill during a save leaves the previous checkpoint intact. Old checkpoints are pruned only
after the new one is complete. `--resume` takes the newest directory that is complete and
loads; a corrupt or partial one is reported and skipped, never loaded half.
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


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_synced(path: Path, write) -> None:
    with open(path, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def _remove(path: Path) -> None:
    """Rename away first (atomic), then delete: a kill mid-delete never leaves a half
    checkpoint under a step-* name that looks complete."""
    trash = path.with_name(f".del-{path.name}-{os.getpid()}")
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


def save_checkpoint(out_dir, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write OUTPUT/checkpoints/step-N atomically, then prune to the newest ``keep`` (0: keep all)."""
    root = Path(out_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    _write_synced(tmp / STATE, lambda f: torch.save(state, f))
    size = (tmp / STATE).stat().st_size
    _write_synced(tmp / MARKER, lambda f: f.write(f"{step} {size}\n".encode()))
    _fsync_dir(tmp)
    if final.exists():
        _remove(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


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
    """Why the checkpoint at ``path`` cannot be used, judged from its files; None if it looks whole."""
    if not is_complete(path):
        return f"no {MARKER} marker (the save was interrupted)"
    if not (path / STATE).is_file():
        return f"{STATE} is missing"
    fields = (path / MARKER).read_text().split()
    size = (path / STATE).stat().st_size
    if len(fields) >= 2 and fields[1].isdigit() and int(fields[1]) != size:
        return f"{STATE} has {size} bytes, {MARKER} says {fields[1]} (truncated or overwritten)"
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
        print(f"prefalign: skipping checkpoint {path}: {problem}.", file=sys.stderr)
    return None
