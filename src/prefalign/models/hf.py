"""The bottom layer of ``prefalign.models``: transformers helpers every loader shares.

Device and dtype choice, quiet loading, reading a config or tokenizer from an already resolved
path (``paths.resolve_model_path``), the pad token, and the checks that a config is a causal LM
and that tokenizers fit their models. Nothing here imports another ``prefalign.models`` module.
"""
from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path
from typing import Optional

import torch

from prefalign.errors import ModelError

log = logging.getLogger(__name__)

# Any of these means the directory ships a tokenizer transformers can load.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json", "spiece.model")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_device(spec: Optional[str] = "auto") -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise any torch device string (cpu, cuda:1)."""
    if spec in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except (RuntimeError, TypeError):
        raise ModelError(f"--device {spec!r} is not a device; use auto, cpu, cuda or cuda:N.") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelError(f"--device {spec} asked for CUDA, but torch sees no GPU; use --device cpu.")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ModelError(f"--device {spec}: only {torch.cuda.device_count()} GPU(s) are visible.")
    return device


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str | torch.device = "cpu",
                  trainable: bool = True) -> torch.dtype:
    """The dtype weights are loaded in.

    ``auto``: float32 on CPU. On CUDA, trainable weights stay float32 (the training loop runs the
    forward under bfloat16 autocast, so AdamW updates fp32 master weights) and frozen models
    (reference, reward, value targets) load in bfloat16 (float16 where the GPU lacks bf16) to halve
    their memory.
    """
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in DTYPES:
        return DTYPES[dtype]
    if dtype != "auto":
        raise ModelError(f"--dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}.")
    if torch.device(device).type != "cuda" or trainable:
        return torch.float32
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16


def enable_activation_checkpointing(model, kwargs: Optional[dict] = None) -> None:
    """Activation checkpointing on a transformers model, non-reentrant unless ``kwargs`` (those of
    torch.utils.checkpoint) say otherwise. transformers 5 renamed gradient_checkpointing_enable (now a
    deprecated alias) to activation_checkpointing_enable, with its keyword renamed too."""
    kwargs = {"use_reentrant": False} if kwargs is None else kwargs
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


@contextlib.contextmanager
def quiet_transformers():
    """Silence transformers' expected load-time notices (e.g. "score.weight newly initialised")."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


def load_config(path: str):
    """The transformers config of a resolved model path (local dir or hub name), as a ModelError on failure."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(path)
    except OSError as e:
        raise loading_error(path, e) from None
    except (ValueError, KeyError) as e:
        raise ModelError(f"{path}/config.json cannot be read by transformers: {e}. "
                         f"Is it a model of an architecture this transformers version knows?") from None


def loading_error(path: str, error: Exception) -> ModelError:
    """The ModelError for a failed ``from_pretrained(path)``: a local directory's own error, or for
    anything else the hint that a hub name needs the network."""
    if os.path.isdir(path):
        return ModelError(f"{path} cannot be loaded: {error}")
    return ModelError(f"{path} is not a local directory, and loading it as a Hugging Face Hub name failed "
                      f"(offline, unreachable, or no such repository). Pass a local model directory or a .gguf "
                      f"file. Details: {str(error).splitlines()[0]}")


def read_tokenizer(path: str):
    """The tokenizer saved at a resolved model path, as it is (no pad token chosen yet)."""
    from transformers import AutoTokenizer

    if os.path.isdir(path) and not any((Path(path) / name).exists() for name in TOKENIZER_FILES):
        raise ModelError(f"{path} has no tokenizer files ({', '.join(TOKENIZER_FILES)}). Copy the tokenizer of "
                         f"the model it was trained from into it (tokenizer.save_pretrained(dir)).")
    try:
        return AutoTokenizer.from_pretrained(path)
    except OSError as e:
        raise loading_error(path, e) from None
    except (ValueError, KeyError, TypeError) as e:
        raise ModelError(f"the tokenizer in {path} cannot be loaded: {e}") from None


def ensure_pad_token(tokenizer, model=None) -> str:
    """Give ``tokenizer`` a pad token when it has none and keep ``model.config.pad_token_id`` in sync.

    Returns how the pad token was chosen: "existing", "unk", "added" or "eos".
    Preference: the tokenizer's own pad token; its unk token; a new "<|pad|>" token, only when a
    ``model`` is given and its embedding matrix already has a spare row for it (never resized);
    finally EOS. Reusing EOS is safe in prefalign because attention and loss masks, not pad ids,
    say which tokens are real: a pad id is only ever a filler under a False mask.
    """
    how = "existing"
    if tokenizer.pad_token is None:
        if tokenizer.unk_token is not None:
            tokenizer.pad_token, how = tokenizer.unk_token, "unk"
        elif model is not None and len(tokenizer) < model.get_input_embeddings().weight.shape[0]:
            tokenizer.add_special_tokens({"pad_token": "<|pad|>"})
            how = "added"
            log.info("added pad token <|pad|> (id %d) in a spare embedding row; embeddings not resized",
                     tokenizer.pad_token_id)
        elif tokenizer.eos_token is not None:
            tokenizer.pad_token, how = tokenizer.eos_token, "eos"
            log.info("tokenizer has no pad or unk token: padding with EOS %r (masks mark real tokens)",
                     tokenizer.eos_token)
        else:
            raise ModelError("the tokenizer has no pad, unk or EOS token to pad with; add one with "
                             "tokenizer.add_special_tokens({'pad_token': ...}) and save it with the model.")
    if model is not None:
        model.config.pad_token_id = tokenizer.pad_token_id
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.pad_token_id = tokenizer.pad_token_id
    return how


def check_causal_lm_config(path: str, config) -> None:
    """ModelError unless ``config`` describes a causal LM (and not a saved reward/value model)."""
    from transformers import MODEL_FOR_CAUSAL_LM_MAPPING

    architectures = list(getattr(config, "architectures", None) or [])
    if any(a.endswith("ForSequenceClassification") for a in architectures):
        raise ModelError(f"{path} is a reward/value model ({architectures[0]}), not a causal LM: pass it as "
                         f"--reward-model, or pass the policy it was trained from as --model.")
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        names = ", ".join(architectures) or config.model_type
        raise ModelError(f"{path} holds a {names} model, which is not a causal (decoder-only) language model. "
                         f"prefalign needs a model AutoModelForCausalLM loads (Llama, Qwen2, SmolLM2, GPT-2, ...).")


def check_vocab(path: str, tokenizer, model) -> None:
    """ModelError when the tokenizer has ids the model's embedding has no row for."""
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tokenizer) > rows:
        raise ModelError(f"{path}: the tokenizer has {len(tokenizer)} tokens but the model's embedding has only "
                         f"{rows} rows; the tokenizer does not belong to this model. Save the model's own "
                         f"tokenizer next to its weights.")


def check_same_vocab(policy_tokenizer, other_tokenizer, policy_path, other_path, role: str = "reference") -> None:
    """ModelError unless two models share one vocabulary (same size, same token -> id map).

    DPO and PPO compare log-probabilities of the same token ids under the policy and the
    reference (and PPO scores the policy's tokens with the reward model): a model with another
    vocabulary reads different tokens and its numbers mean nothing.
    """
    n_policy, n_other = len(policy_tokenizer), len(other_tokenizer)
    if n_policy != n_other:
        why = f"its tokenizer has {n_other} tokens, the policy's ({policy_path}) has {n_policy}"
    elif policy_tokenizer.get_vocab() != other_tokenizer.get_vocab():
        why = f"its tokenizer has as many tokens as the policy's ({policy_path}) but maps them to other ids"
    else:
        return
    raise ModelError(f"{other_path}: the {role} model does not share the policy's vocabulary: {why}. "
                     f"Use a {role} model trained from the same base model as --model.")
