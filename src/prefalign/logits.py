"""Log-probs of chosen positions of a causal LM without its full (B, T, V) logits.

``head_logps(model, inputs, select, targets)`` runs the model's own forward (through DDP, PEFT and
the attention set-up of ``inputs``, so every wrapper behaves as usual) with its output head fed an
empty slice: a forward pre-hook on the head takes the final hidden states the head would have seen
and passes it zero rows. The hidden states at the ``select``-ed positions then go through
``ops_chunked.chunked_token_logps`` with the head's own weight and bias.

That is only the full path's maths when the head is a plain ``nn.Linear`` whose output the model
returns unchanged. ``plain_linear_head`` says so from the module and the config (soft-capping and
logit scales are refused by name); the first call per model also checks it: the head gets one
position instead of none, and the logits the model returns there must equal ``head(hidden)`` bit
for bit. A model that fails either check gets ``None`` (the caller computes full logits) and one
line on stderr.
"""
from __future__ import annotations

import sys
import weakref
from contextlib import contextmanager
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from prefalign.ops_chunked import TokenLogps, chunked_token_logps

# Config fields of transformers models that change logits after the head, with their no-op value.
LOGIT_POSTPROCESSING = {
    "final_logit_softcapping": None,  # Gemma 2/3/3n/4: cap * tanh(logits / cap)
    "logit_scale": 1.0,  # Cohere: logits * logit_scale
    "logits_scaling": 1.0,  # Granite: logits / logits_scaling
    "lm_head_multiplier": 1.0,  # Falcon-H1: logits * lm_head_multiplier
}

_verdicts: "weakref.WeakKeyDictionary[nn.Module, Optional[str]]" = weakref.WeakKeyDictionary()  # None: plain
_probed: "weakref.WeakSet[nn.Module]" = weakref.WeakSet()  # models whose returned logits were checked


def causal_lm(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP / DataParallel / PEFT wrappers."""
    for _ in range(4):
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "get_base_model"):  # peft
            model = model.get_base_model()
        else:
            break
    return model


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:
        try:  # torch 2.4
            from torch.distributed._tensor import DTensor
        except ImportError:  # a build without torch.distributed
            return False
    return isinstance(t, DTensor)


def _refusal(lm: nn.Module) -> Optional[str]:
    """Why ``lm``'s logits are not ``head(final hidden states)``, or None."""
    head = lm.get_output_embeddings() if hasattr(lm, "get_output_embeddings") else None
    if type(head) is not nn.Linear:  # exact type: LoRA, quantised and custom heads are not plain
        return f"has an output head that is not a plain linear layer ({type(head).__name__})"
    if _is_dtensor(head.weight):
        return "has sharded head weights (FSDP)"
    config = getattr(lm, "config", None)
    configs = [config] + ([config.get_text_config()] if hasattr(config, "get_text_config") else [])
    for c in configs:
        for name, neutral in LOGIT_POSTPROCESSING.items():
            value = getattr(c, name, None)
            if value is not None and value != neutral:
                return f"post-processes its logits ({name}={value})"
    return None


def _notice(lm: nn.Module, reason: str) -> None:
    print(f"prefalign: {type(lm).__name__} {reason}; using full logits", file=sys.stderr)


def plain_linear_head(model: nn.Module) -> Optional[nn.Linear]:
    """The model's output head when its logits are exactly ``head(final hidden states)``; else
    None, after one line on stderr (once per model)."""
    lm = causal_lm(model)
    if lm not in _verdicts:
        _verdicts[lm] = _refusal(lm)
        if _verdicts[lm] is not None:
            _notice(lm, _verdicts[lm])
    return None if _verdicts[lm] is not None else lm.get_output_embeddings()


@contextmanager
def _head_input(head: nn.Module, keep: int):
    """Inside the block the head gets only the last ``keep`` positions of its input (0: none);
    yields a list that receives each full input (..., T, H)."""
    seen = []

    def hook(module, args, kwargs):
        x = args[0] if args else kwargs.pop("input")  # (..., T, H)
        seen.append(x)
        return (x[..., x.shape[-2] - keep:, :],) + tuple(args[1:]), kwargs

    handle = head.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        yield seen
    finally:
        handle.remove()


def final_hidden_states(model: nn.Module, head: nn.Linear, inputs: dict) -> Optional[torch.Tensor]:
    """``model(**inputs)``'s final hidden states (B, T, H), the head's input, with no logits computed.

    The first call for a model also checks that its logits are the head's output unchanged; None
    (and a notice) when they are not, or when the head was not called exactly once.
    """
    lm = causal_lm(model)
    probe = lm not in _probed
    with _head_input(head, keep=1 if probe else 0) as seen:
        out = model(**inputs)
    reason = None
    if len(seen) != 1:
        reason = f"called its output head {len(seen)} times in one forward"
    elif probe:
        _probed.add(lm)
        hidden = seen[0][..., -1:, :]
        with torch.no_grad():
            expected = F.linear(hidden, head.weight, head.bias)
        logits = getattr(out, "logits", None)
        if logits is None or logits.shape != expected.shape or not torch.equal(logits.float(), expected.float()):
            reason = "post-processes its logits (they differ from its head's output)"
    if reason is not None:
        _verdicts[lm] = reason
        _notice(lm, reason)
        return None
    return seen[0]


def head_logps(model: nn.Module, inputs: dict, select: torch.Tensor, targets: torch.Tensor, *,
               temperature: float = 1.0, with_entropy: bool = False, with_argmax: bool = False,
               chunk_tokens: Optional[int] = None) -> Optional[TokenLogps]:
    """Log-probs (and entropy, argmax) of ``targets`` under the model's next-token distributions at
    the ``select``-ed positions, with the head applied chunk by chunk (``chunked_token_logps``).

    inputs: kwargs of ``model(**inputs)`` (input_ids (B, T), position ids, attention kwargs...);
    select: the N positions whose state predicts a target, either (B, T) bool (targets in its
    row-major order) or (N,) long flat indices b * T + t into the (B, T) positions, in the order of
    the targets and possibly repeated (one state predicting two targets, as a shared prompt's last
    token does in DPO); targets (N,) long. Returns TokenLogps of (N,) tensors, or None when the
    model needs its full logits (``plain_linear_head``): the caller then computes them as before.
    """
    head = plain_linear_head(model)
    if head is None:
        return None
    hidden = final_hidden_states(model, head, inputs)
    if hidden is None:
        return None
    if select.dtype == torch.bool:
        if hidden.shape[:-1] != select.shape:
            raise ValueError(f"head_logps: select {tuple(select.shape)} does not match the model's final hidden "
                             f"states {tuple(hidden.shape)}.")
        rows = hidden[select]  # (N, H)
    elif select.dim() == 1 and not select.is_floating_point():
        rows = hidden.flatten(0, -2)[select]  # (N, H)
    else:
        raise ValueError(f"head_logps: select must be (B, T) bool or (N,) long flat indices, got "
                         f"{tuple(select.shape)} {select.dtype}.")
    return chunked_token_logps(rows, head.weight, head.bias, targets, temperature=temperature,
                               chunk_tokens=chunk_tokens, with_entropy=with_entropy, with_argmax=with_argmax)
