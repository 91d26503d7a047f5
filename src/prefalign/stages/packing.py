"""Packed or padded rows: the layout a stage trains on, chosen once its models are loaded.

``--packing`` unset (the default, "auto") packs when every model that reads the rows runs
``prefalign_packed`` attention (models/attention.py): plain causal SDPA models (Llama, Qwen2,
Mistral without a sliding window, GPT-2, ...), for which packed rows give the padded batch's
numbers to float rounding at the cost of the real tokens only. Anything else (eager or flash
attention, sliding windows, chunked or non-causal attention, models that do not dispatch through
transformers' AttentionInterface) trains on padded rows, and the run says why. ``--packing``
packs with any model (transformers' block-diagonal mask from the restarting position ids);
``--no-packing`` pads. The choice is one stderr line and summary.json's ``layout``.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Optional

from torch import nn

from prefalign.models.attention import packing_blocker

REQUESTED = {None: "auto", True: "--packing", False: "--no-packing"}


@dataclass(frozen=True)
class RowLayout:
    packed: bool
    requested: str  # auto, --packing or --no-packing
    why: str

    @property
    def rows(self) -> str:
        return "packed" if self.packed else "padded"

    def info(self) -> dict:
        """summary.json's ``layout``."""
        return {"rows": self.rows, "packing": self.requested, "why": self.why}


def choose_layout(packing: Optional[bool], readers: dict[str, nn.Module]) -> RowLayout:
    """The layout for ``packing`` (None: auto) given the models that read the rows, by role
    (e.g. {"policy": model, "reference": ref}); a model listed under two roles counts once."""
    requested = REQUESTED[packing]
    if packing is not None:
        return RowLayout(packing, requested, f"{requested} given")
    unique: dict[int, str] = {}
    for role, model in readers.items():
        unique.setdefault(id(model), role)
    models = {role: readers[role] for role in unique.values()}
    blocked = [f"the {role}: {why}" for role, m in models.items() if (why := packing_blocker(m)) is not None]
    if blocked:
        return RowLayout(False, requested, "; ".join(blocked) + "; --packing packs anyway")
    roles = " and ".join(f"the {role}" for role in models)
    return RowLayout(True, requested, f"auto: {roles} run{'s' if len(models) == 1 else ''} "
                                      f"per-example attention; --no-packing pads")


def announce(stage: str, layout: RowLayout, detail: str = "", show: bool = True) -> None:
    """One stderr line, e.g. ``prefalign dpo: packed rows (auto: the policy runs per-example attention...)``;
    ``detail`` follows "rows" (", 12 examples in 3 rows")."""
    if show:
        print(f"prefalign {stage}: {layout.rows} rows{detail} ({layout.why})", file=sys.stderr)
