"""Load causal LMs and their tokenizers from what ``--model`` names (directory, .gguf file, hub name).

Every failure a user can cause (a wrong path, a directory that is not a model, a tokenizer
that does not belong to the model, an architecture that is not a causal LM) becomes a
``ModelError`` that names the path and what to do, never a deep transformers traceback.
"""
from __future__ import annotations

from typing import Optional

import torch

from prefalign.errors import ModelError
from prefalign.models.attention import use_packed_attention
from prefalign.models.hf import (check_causal_lm_config, check_vocab, ensure_pad_token, load_config, loading_error,
                                 read_tokenizer, resolve_device, resolve_dtype)
from prefalign.models.paths import resolve_model_path


def load_tokenizer(path: str):
    """A transformers tokenizer from a model directory, .gguf file or hub name, with a pad token set."""
    path = resolve_model_path(path)
    tokenizer = read_tokenizer(path)
    ensure_pad_token(tokenizer)
    return tokenizer


def load_causal_lm(path: str, dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                   attn_implementation: Optional[str] = None, trainable: bool = True):
    """``(model, tokenizer)`` for any AutoModelForCausalLM from a directory, .gguf file or hub name.

    ``trainable=False`` returns the model in eval mode with ``requires_grad`` off (reference,
    frozen policies). ``attn_implementation`` defaults to "sdpa".
    """
    from transformers import AutoModelForCausalLM

    path = resolve_model_path(path)
    device = resolve_device(device) if isinstance(device, str) else device
    config = load_config(path)
    check_causal_lm_config(path, config)
    tokenizer = read_tokenizer(path)
    try:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=resolve_dtype(dtype, device, trainable),
                                                     attn_implementation=attn_implementation or "sdpa")
    except OSError as e:
        raise loading_error(path, e) from None
    except (ValueError, ImportError) as e:
        raise ModelError(f"{path} cannot be loaded as a causal LM (attn_implementation="
                         f"{attn_implementation or 'sdpa'}): {e}") from None
    check_vocab(path, tokenizer, model)
    ensure_pad_token(tokenizer, model)
    use_packed_attention(model)  # SDPA exactly, but packed rows pay only for their examples' attention
    model.to(device)
    if not trainable:
        model.eval().requires_grad_(False)
    return model, tokenizer
