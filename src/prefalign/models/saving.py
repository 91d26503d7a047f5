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


ADAPTER_DIR = "adapter"  # OUTPUT/adapter: a LoRA run's adapter in PEFT format


def save_pretrained(model, tokenizer, out_dir: str, state_dict=None, merge: bool = True,
                    adapter_base: Optional[str] = None) -> None:
    """Write ``model`` and ``tokenizer`` to ``out_dir`` so plain transformers (and peft) load them back.

    A LoRA model (``apply_lora``) writes its adapter to ``out_dir/adapter`` in PEFT format
    (adapter_config.json, adapter_model.safetensors, and the tokenizer, so the folder can be
    pushed as it is), loadable with ``PeftModel.from_pretrained(base, out_dir/adapter)``; a reward
    model's trained scalar head goes with it (a PEFT module to save). ``adapter_base`` is the
    base_model_name_or_path it records (default: the folder the base was loaded from). Unless
    ``merge=False`` the model is also saved with its adapter merged in: a plain HF checkpoint in
    ``out_dir``. A ScalarModel saves as a ``*ForSequenceClassification`` checkpoint with its reward
    shift and scale. ``state_dict`` (the full weights keyed like ``model.state_dict()``) replaces
    the model's own tensors: an FSDP-sharded model is saved from the state gathered on rank 0
    (not with LoRA).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    inner = model.model if isinstance(model, ScalarModel) else model
    if state_dict is not None and is_peft_model(inner):
        raise ModelError("saving a LoRA model from a gathered state_dict is not supported.")
    if not merge and not is_peft_model(inner):
        raise ModelError("merge=False keeps a LoRA adapter apart; this model has none (apply_lora).")
    if is_peft_model(inner):
        save_adapter(inner, tokenizer, out / ADAPTER_DIR, adapter_base)
    if merge and isinstance(model, ScalarModel):
        save_scalar_model(model, str(out), state_dict=state_dict)
    elif merge and state_dict is not None:
        model.save_pretrained(str(out), state_dict=state_dict)
    elif merge:
        merged_copy(model).save_pretrained(str(out))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))


def save_adapter(peft_model, tokenizer, out_dir: Path, base: Optional[str] = None) -> None:
    """The adapter alone (PEFT format) and the tokenizer in ``out_dir``; ``base`` (e.g. the --model
    path or hub name) becomes adapter_config.json's base_model_name_or_path."""
    config = peft_model.peft_config[peft_model.active_adapter]
    recorded = config.base_model_name_or_path
    if base is not None:
        config.base_model_name_or_path = str(base)
    try:
        peft_model.save_pretrained(str(out_dir))
    finally:
        config.base_model_name_or_path = recorded  # the training model stays as it was
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


def lora_summary(model, base: Optional[str], merge: bool) -> dict:
    """summary.json's ``lora`` entry for a LoRA model (what OUTPUT holds), else {}."""
    if not is_peft_model(model.model if isinstance(model, ScalarModel) else model):
        return {}
    entry = {"adapter": ADAPTER_DIR, "adapter_base": base, "merged_model": merge}
    if not merge:
        entry["note"] = (f"--no-merge-lora: OUTPUT holds the adapter ({ADAPTER_DIR}/, PEFT format, on the base "
                         f"{base}) and the tokenizer, no merged model; load it with PeftModel.from_pretrained(base "
                         f"model, OUTPUT/{ADAPTER_DIR}).")
        if isinstance(model, ScalarModel):
            entry["note"] += (f" The adapter holds the scalar head; the reward shift and scale ({SHIFT_KEY} = "
                              f"{model.shift:g}, {SCALE_KEY} = {model.scale:g}) are not in it.")
    return {"lora": entry}


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
