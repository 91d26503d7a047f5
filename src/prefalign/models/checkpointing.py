"""Activation checkpointing for models that stay in eval mode: the online loops' (ppo, rloo, grpo,
online-dpo) trainable policy, value model or shared-head backbone, LoRA-wrapped or not.

transformers checkpoints a decoder layer only when ``layer.gradient_checkpointing and layer.training``
(and, from 5.x, gradients are enabled): ``GradientCheckpointingLayer`` in transformers/modeling_layers.py.
The online loops keep their trainable models in eval mode for the whole run, so that the log-probs
recorded while sampling equal those recomputed in the update; enabling checkpointing alone would
checkpoint nothing. So:

    prepare_checkpointing(model, role, path)   refuse a config with dropout, then enable non-reentrant
                                               checkpointing on every decoder layer
    recompute_in_backward(*models)             around the update's gradient forward: the checkpointed
                                               layers' own ``training`` flag is True, nothing else's

Only the layer modules themselves flip (``layer.training = True``, not ``layer.train()``): their
submodules (attention, MLP, every ``nn.Dropout``, LoRA's dropout, MoE routers) stay in eval mode, so
attention dropout gated by the attention module's flag and dropout modules stay off. Sampling (KV
cache) and no-grad scoring run outside the context, unchanged. What the flip can reach is code in a
layer's *own* forward that reads its flag: OPT, Falcon, BioGPT, XGLM, DBRX and Doge decoder layers
apply their config's dropout there, hence the refusal of any nonzero dropout in the config.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Optional

from torch import nn

from prefalign.errors import ConfigError, ModelError
from prefalign.models.hf import enable_activation_checkpointing
from prefalign.models.scalar import ScalarModel


def dropout_fields(config) -> dict[str, float]:
    """Nonzero dropout probabilities of a transformers config: numeric keys naming dropout or pdrop
    (attention_dropout, hidden_dropout, resid_pdrop, ...), nested configs as ``text_config.key``."""
    found = {}

    def walk(d: dict, prefix: str) -> None:
        for key, value in d.items():
            key = str(key)  # id2label's keys are ints
            if isinstance(value, dict):
                walk(value, f"{prefix}{key}.")
            elif ("dropout" in key or "pdrop" in key) and isinstance(value, (int, float)) \
                    and not isinstance(value, bool) and value > 0:
                found[prefix + key] = float(value)

    walk(config.to_dict(), "")
    return found


def transformers_model(model: nn.Module) -> nn.Module:
    """The transformers model under a ScalarModel and/or a peft wrapper."""
    inner = model.model if isinstance(model, ScalarModel) else model
    return inner.get_base_model() if hasattr(inner, "get_base_model") else inner


def checkpointed_layers(*models: Optional[nn.Module]) -> list[nn.Module]:
    """The decoder layers of ``models`` (None skipped) that checkpoint when in training mode."""
    from transformers.modeling_layers import GradientCheckpointingLayer

    return [m for model in models if model is not None for m in model.modules()
            if isinstance(m, GradientCheckpointingLayer) and m.gradient_checkpointing]


def prepare_checkpointing(model: nn.Module, role: str, path: str) -> None:
    """--gradient-checkpointing for an online loop's trainable ``model`` (the ``role`` loaded from
    ``path``, named in errors): a ConfigError when its config sets any dropout, else non-reentrant
    checkpointing on its decoder layers, taking effect only inside ``recompute_in_backward``."""
    fields = dropout_fields(model.config)
    if fields:
        named = ", ".join(f"{k} = {v:g}" for k, v in fields.items())
        raise ConfigError(
            f"--gradient-checkpointing: the {role} ({path}) sets {named} in its config.json. The online loops run "
            f"without dropout; with checkpointing the decoder layers run in training mode in the update's forward, "
            f"and some architectures apply that dropout in the layer itself. Set {' and '.join(fields)} to 0 in "
            f"{path}/config.json (or in a copy of the model), or drop --gradient-checkpointing.")
    unsupported = ""
    try:
        enable_activation_checkpointing(transformers_model(model))
    except ValueError as e:  # transformers: the model class "does not support activation checkpointing"
        unsupported = f" ({e})"
    if unsupported or not checkpointed_layers(model):
        raise ModelError(f"--gradient-checkpointing: the {role} ({path}, {type(transformers_model(model)).__name__}) "
                         f"has no decoder layer transformers can checkpoint (GradientCheckpointingLayer){unsupported}; "
                         f"drop --gradient-checkpointing for this model.")


@contextlib.contextmanager
def recompute_in_backward(*models: Optional[nn.Module]) -> Iterator[None]:
    """Within: the checkpointed decoder layers of ``models`` run with ``training = True`` (the layer
    modules alone; every submodule keeps its mode), so a forward with gradients keeps each layer's
    input only and recomputes the layer in backward. Modes are restored on exit. A no-op for models
    without checkpointing enabled."""
    layers = checkpointed_layers(*models)
    modes = [layer.training for layer in layers]
    for layer in layers:
        layer.training = True
    try:
        yield
    finally:
        for layer, mode in zip(layers, modes):
            layer.training = mode
