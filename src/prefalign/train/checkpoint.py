"""Atomic checkpoints and exact resume.

A checkpoint is a directory OUTPUT/checkpoints/step-000123 holding `state.pt` (model,
optimizer, scheduler, RNG states, data position, stage extras) and `COMPLETE`. It is written
under a temporary name, fsynced, then renamed, so a kill during a save leaves the previous
checkpoint intact. `--resume` takes the newest directory that is complete and loads; a
corrupt or partial one is reported and skipped, never loaded half.
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


def rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(out_dir, step: int, state: dict[str, Any], keep: int = 2) -> Path:
    """Write OUTPUT/checkpoints/step-N atomically, then prune to the newest ``keep``."""
    root = Path(out_dir) / CKPT_DIR
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir()
    with open(tmp / "state.pt", "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    with open(tmp / MARKER, "w") as f:
        f.write(f"{step}\n")
        f.flush()
        os.fsync(f.fileno())
    _fsync_dir(tmp)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(root)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    done = sorted(p for p in root.glob("step-*") if (p / MARKER).exists())
    for old in done[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    for stale in root.glob(".tmp-step-*"):  # leftovers of killed saves
        shutil.rmtree(stale, ignore_errors=True)


def load_latest(out_dir, map_location="cpu") -> Optional[tuple[Path, dict[str, Any]]]:
    """The newest complete checkpoint that loads, or None. Broken ones are reported and skipped."""
    root = Path(out_dir) / CKPT_DIR
    if not root.exists():
        return None
    for path in sorted(root.glob("step-*"), reverse=True):
        if not (path / MARKER).exists():
            print(f"prefalign: skipping incomplete checkpoint {path} (no {MARKER} marker).", file=sys.stderr)
            continue
        try:
            state = torch.load(path / "state.pt", map_location=map_location, weights_only=False)
        except Exception as e:  # a truncated or corrupt file must never be loaded half
            print(f"prefalign: skipping unreadable checkpoint {path}: {type(e).__name__}: {e}", file=sys.stderr)
            continue
        return path, state
    return None
