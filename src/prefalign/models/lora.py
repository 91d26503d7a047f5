"""LoRA adapters (the peft extra): apply, switch off for a reference pass, merge for saving.

With LoRA, DPO and PPO need no second copy of the model for the reference: the frozen base
weights *are* the reference, reached by running the same model inside ``disabled_adapter``.
"""
from __future__ import annotations

import contextlib
import copy
import sys
from typing import Iterator, Optional, Sequence

from torch import nn

from prefalign.errors import ModelError
from prefalign.models.scalar import ScalarModel

OUTPUT_HEADS = ("lm_head", "score")  # trained in full (score) or left frozen (lm_head), never adapted


def _peft():
    try:
        import peft
    except ImportError:
        raise ModelError("LoRA needs the peft package: pip install 'prefalign[peft]'.") from None
    return peft


def is_peft_model(model) -> bool:
    """Whether ``model`` is a peft PeftModel. Only a process that imported peft can hold one, so a run
    without LoRA does not import peft here (about a second of a short run's start-up under load)."""
    peft = sys.modules.get("peft")
    return peft is not None and isinstance(model, peft.PeftModel)


def default_lora_targets(model: nn.Module) -> list[str]:
    """Leaf names of every linear layer except the output head.

    For Llama-like models (Llama, Qwen2, Mistral, SmolLM2) that is exactly the attention and MLP
    projections: q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj. GPT-2's Conv1D
    layers (c_attn, c_proj, c_fc) count as linear too.
    """
    from transformers.pytorch_utils import Conv1D

    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if isinstance(module, (nn.Linear, Conv1D))}
    return sorted(names - set(OUTPUT_HEADS))


def apply_lora(model, r: int = 16, alpha: int = 32, dropout: float = 0.0,
               target_modules: Optional[str | Sequence[str]] = None):
    """Freeze ``model`` and add LoRA adapters (scaling alpha / r); returns the model to train.

    A causal LM comes back as a peft ``PeftModel``. A ``ScalarModel`` is adapted in place (its
    inner model is wrapped) and its ``score`` head stays fully trainable; it is returned itself.
    ``target_modules``: module leaf names, a list or a comma-separated string; default
    ``default_lora_targets(model)``.
    """
    peft = _peft()
    inner = model.model if isinstance(model, ScalarModel) else model
    if isinstance(target_modules, str):
        target_modules = [t.strip() for t in target_modules.split(",") if t.strip()]
    targets = list(target_modules or default_lora_targets(inner))
    present = {name.rsplit(".", 1)[-1] for name, _ in inner.named_modules()}
    unknown = sorted(set(targets) - present)
    if unknown:
        raise ModelError(f"--lora-target-modules names {', '.join(unknown)}, which this model does not have; "
                         f"its linear layers are {', '.join(default_lora_targets(inner))}.")
    config = peft.LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets,
                             modules_to_save=["score"] if isinstance(model, ScalarModel) else None)
    wrapped = peft.get_peft_model(inner, config)
    if _checkpointing(inner):
        wrapped.enable_input_require_grads()  # checkpointed blocks need an input that requires grad
    if isinstance(model, ScalarModel):
        model.model = wrapped
        return model
    return wrapped


def _checkpointing(model) -> bool:
    # transformers 5 renamed is_gradient_checkpointing (deprecated) to is_activation_checkpointing
    name = "is_activation_checkpointing" if hasattr(model, "is_activation_checkpointing") else "is_gradient_checkpointing"
    return bool(getattr(model, name, False))


@contextlib.contextmanager
def disabled_adapter(model) -> Iterator[None]:
    """Run ``model`` with its LoRA adapters switched off: the base (reference) model, no copy."""
    inner = model.model if isinstance(model, ScalarModel) else model
    if not is_peft_model(inner):
        raise ModelError("disabled_adapter needs a model with LoRA adapters (apply_lora); without LoRA, "
                         "load a separate reference model instead.")
    with inner.disable_adapter():
        yield


def merged_copy(model):
    """``model`` itself, or for a peft model a deep copy with the adapters merged into the weights
    (a plain transformers model). Copying keeps the training model and its optimizer state intact."""
    if not is_peft_model(model):
        return model
    return copy.deepcopy(model).merge_and_unload()
