"""A value head on the policy's backbone (``ppo --shared-value-head``): a linear layer on the final
hidden state, initialised like a reward head, saved as OUTPUT/value_model/value_head.pt and loaded
back by a later run's --value-model.

Beside value_head.pt, value_head.sha256 records its byte size and sha256 when it was written, so a
truncated or bit-flipped head is refused with a clear error instead of being loaded (a head of an
older prefalign, without that file, is still checked for its keys and shape).
"""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from prefalign.errors import ConfigError, ModelError
from prefalign.train import diskio

HEAD_FILE = "value_head.pt"
SUM_FILE = "value_head.sha256"


def save_value_head(head: nn.Module, folder: Path) -> None:
    """value_head.pt and value_head.sha256 in ``folder`` (created). An OSError of a failed write is
    raised as such (torch.save's own words for it hide the cause); the caller's guard reports it."""
    folder.mkdir(parents=True, exist_ok=True)
    size, digest = diskio.write_stream(folder / HEAD_FILE, lambda f: torch.save(head.state_dict(), f))
    diskio.write_stream(folder / SUM_FILE, lambda f: f.write(f"{size} {digest}\n".encode()))


def damage_of(file: Path) -> str | None:
    """Why ``file`` is not what was written (its value_head.sha256 says so), or None."""
    record = file.with_name(SUM_FILE)
    if not record.is_file():
        return None
    fields = record.read_text(errors="replace").split()
    size = file.stat().st_size
    if len(fields) < 2 or not fields[0].isdigit():
        return f"its {SUM_FILE} is unreadable"
    if int(fields[0]) != size:
        return f"it has {size} bytes, {SUM_FILE} recorded {fields[0]} (truncated or overwritten)"
    if diskio.file_sha256(file) != fields[1]:
        return f"it does not match the sha256 in {SUM_FILE} (damaged on disk: a flipped bit or a bad sector)"
    return None


def load_value_head(path: str, hidden_size: int) -> dict:
    """The state dict of a shared value head saved by an earlier `prefalign ppo --shared-value-head`
    (its OUTPUT/value_model folder, or the value_head.pt in it), checked against its recorded
    checksum and the policy's width."""
    file = Path(path) / HEAD_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file() or file.suffix != ".pt":
        raise ConfigError(f"--value-model {path} with --shared-value-head must be the value_model folder of an "
                          f"earlier `prefalign ppo --shared-value-head` run (it holds {HEAD_FILE}), or that file.")
    damage = damage_of(file)
    if damage is not None:
        raise ModelError(f"{file} is damaged: {damage}. It was not loaded. Copy it again from where it came from, "
                         f"or rerun the `prefalign ppo --shared-value-head` run that wrote it.")
    try:
        state = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated file, a pickle that is not plain tensors, ...
        raise ModelError(f"{file} cannot be read as a value head ({type(e).__name__}: {e}). Pass the value_model "
                         f"folder of an earlier `prefalign ppo --shared-value-head` run.") from None
    if (not isinstance(state, dict) or set(state) != {"weight", "bias"}
            or not all(torch.is_tensor(v) for v in state.values()) or tuple(state["bias"].shape) != (1,)):
        raise ModelError(f"{file} is not a value head saved by `prefalign ppo --shared-value-head` (expected a "
                         f"state dict with weight and bias). Pass the value_model folder of such a run.")
    shape = tuple(state["weight"].shape)
    if shape != (1, hidden_size):
        raise ModelError(f"{file} holds a value head of shape {shape}; this policy (hidden size {hidden_size}) "
                         f"needs (1, {hidden_size}). Pass the value_model folder of a run with this policy.")
    return state


def new_value_head(hidden_size: int, seed: int) -> nn.Linear:
    """A linear value head on the policy's hidden state, N(0, 1/(H+1)) as reward heads are initialised."""
    head = nn.Linear(hidden_size, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden_size + 1))
        head.bias.zero_()
    return head
