"""Model I/O for every stage: causal LMs and tokenizers, scalar-head reward/value models,
LoRA adapters, saving, and GGUF files as models.

    load_causal_lm(path, dtype="auto", device="cpu", attn_implementation=None, trainable=True) -> (model, tokenizer)
    load_scalar_model(path, ...) -> (ScalarModel, tokenizer)
    save_pretrained(model, tokenizer, out_dir, merge=True, adapter_base=None)   # LoRA: also out_dir/adapter

Layers, each importing only those before it (attention.py stands alone):
hf -> gguf -> paths -> causal_lm -> scalar -> lora -> saving; checkpointing (the online loops'
activation checkpointing) imports hf and scalar.
"""
from prefalign.models.causal_lm import load_causal_lm, load_tokenizer
from prefalign.models.checkpointing import (checkpointed_layers, dropout_fields, prepare_checkpointing,
                                            recompute_in_backward)
from prefalign.models.gguf import cache_root, convert_gguf, find_smollm2_gguf, gguf_key
from prefalign.models.hf import check_same_vocab, ensure_pad_token, resolve_device, resolve_dtype
from prefalign.models.lora import apply_lora, default_lora_targets, disabled_adapter, is_peft_model, merged_copy
from prefalign.models.paths import resolve_model_path
from prefalign.models.saving import ADAPTER_DIR, lora_summary, save_adapter, save_pretrained
from prefalign.models.scalar import ScalarModel, last_token_index, load_scalar_model, segment_last_index

__all__ = [
    "ADAPTER_DIR", "ScalarModel", "apply_lora", "cache_root", "check_same_vocab", "checkpointed_layers",
    "convert_gguf", "default_lora_targets", "disabled_adapter", "dropout_fields", "ensure_pad_token",
    "find_smollm2_gguf", "gguf_key", "is_peft_model", "last_token_index", "load_causal_lm", "load_scalar_model",
    "load_tokenizer", "lora_summary", "merged_copy", "prepare_checkpointing", "recompute_in_backward",
    "resolve_device", "resolve_dtype", "resolve_model_path", "save_adapter", "save_pretrained", "segment_last_index",
]
