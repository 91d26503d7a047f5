"""Save any model prefalign trained as a checkpoint plain transformers loads back.

The top layer of ``prefalign.models``: saving has to know every kind of model below it (causal
LMs, ``ScalarModel`` reward/value models, LoRA-wrapped versions of both).
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from prefalign.errors import ModelError
from prefalign.models.lora import is_peft_model, merged_copy
from prefalign.models.scalar import SCALE_KEY, SHIFT_KEY, ScalarModel


def save_pretrained(model, tokenizer, out_dir: str, save_adapter: bool = False, state_dict=None) -> None:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` so plain transformers loads them back.

    A LoRA model is saved merged (a plain HF checkpoint); ``save_adapter=True`` also writes the
    adapter alone to ``out_dir/adapter`` (peft format). A ScalarModel saves as a
    ``*ForSequenceClassification`` checkpoint with its reward shift and scale. ``state_dict``
    (the full weights keyed like ``model.state_dict()``) replaces the model's own tensors: an
    FSDP-sharded model is saved from the state gathered on rank 0 (not with LoRA).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if state_dict is not None and is_peft_model(getattr(model, "model", model)):
        raise ModelError("saving a LoRA model from a gathered state_dict is not supported.")
    if isinstance(model, ScalarModel):
        save_scalar_model(model, str(out), state_dict=state_dict)
        inner = model.model
    elif state_dict is not None:
        model.save_pretrained(str(out), state_dict=state_dict)
        inner = model
    else:
        merged_copy(model).save_pretrained(str(out))
        inner = model
    if save_adapter:
        if not is_peft_model(inner):
            raise ModelError("save_adapter=True needs a model with LoRA adapters (apply_lora).")
        inner.save_pretrained(str(out / "adapter"))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_scalar_model(model: ScalarModel, out_dir: str, state_dict: Optional[dict] = None) -> None:
    """A standard HF sequence-classification checkpoint whose config.json keeps shift and scale.
    ``state_dict`` (keyed like ``model.state_dict()``) replaces the weights, e.g. gathered from FSDP.

    A head bias (where ``ScalarModel.fold_normalization`` put a value model's reward normalisation;
    transformers' ``score`` layers have none) is saved as the shift: ``(w.h + b - s) / k = (w.h - (s - b)) / k``,
    so plain transformers, ``normalized`` and a later fold all read the same values."""
    if state_dict is not None:  # drop ScalarModel's "model." prefix: keys of the wrapped HF model
        state_dict = {k[len("model."):]: v for k, v in state_dict.items() if k.startswith("model.")}
    elif getattr(model.head, "bias", None) is not None:
        state_dict = model.model.state_dict()
    bias = state_dict.pop("score.bias", None) if state_dict is not None else None
    live_shift = model.shift
    setattr(model.config, SHIFT_KEY, live_shift - (float(bias) if bias is not None else 0.0))
    setattr(model.config, SCALE_KEY, model.scale)
    try:
        if state_dict is not None:
            model.model.save_pretrained(out_dir, state_dict=state_dict)
        else:
            merged_copy(model.model).save_pretrained(out_dir)
    finally:
        setattr(model.config, SHIFT_KEY, live_shift)
