"""A value head on the policy's backbone (``ppo --shared-value-head``): a linear layer on the final
hidden state, initialised like a reward head, saved as OUTPUT/value_model/value_head.pt and loaded
back by a later run's --value-model."""
from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from prefalign.errors import ConfigError, ModelError

VALUE_HEAD_FILE = "value_head.pt"


def new_value_head(hidden_size: int, seed: int) -> nn.Linear:
    """A linear value head on the policy's hidden state, N(0, 1/(H+1)) as reward heads are initialised."""
    head = nn.Linear(hidden_size, 1)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=g) / math.sqrt(hidden_size + 1))
        head.bias.zero_()
    return head


def load_value_head(path: str, hidden_size: int) -> dict:
    """The state dict of a shared value head saved by an earlier `prefalign ppo --shared-value-head`
    (its OUTPUT/value_model folder, or the value_head.pt in it), checked against the policy's width."""
    file = Path(path) / VALUE_HEAD_FILE if Path(path).is_dir() else Path(path)
    if not file.is_file() or file.suffix != ".pt":
        raise ConfigError(f"--value-model {path} with --shared-value-head must be the value_model folder of an "
                          f"earlier `prefalign ppo --shared-value-head` run (it holds value_head.pt), or that file.")
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


def save_value_head(head: nn.Module, folder: Path) -> None:
    """``head``'s state dict as folder/value_head.pt (the folder is created)."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(head.state_dict(), folder / VALUE_HEAD_FILE)
