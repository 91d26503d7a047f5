"""Tiny tokenizers and Llama models built in-process: for tests, benchmarks and the demo lab.

Nothing here downloads anything. Two tokenizer families cover what users bring:
byte-level BPE (GPT-2 / Llama-3 style) and a SentencePiece-style BPE (Metaspace "▁", Llama-2 style).
"""
from __future__ import annotations

from typing import Iterable, Literal

SPECIALS = ["<pad>", "<s>", "</s>", "<unk>"]

# A minimal ChatML-like template so conversational data can be tested without any download.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def tiny_tokenizer(texts: Iterable[str], kind: Literal["bpe", "sentencepiece"] = "bpe", vocab_size: int = 512,
                   add_bos: bool = False, chat_template: bool = True):
    """Train a tokenizer on ``texts`` and wrap it as a transformers PreTrainedTokenizerFast.

    kind="bpe": byte-level BPE. kind="sentencepiece": BPE over Metaspace pieces ("▁word").
    add_bos: prepend <s> to every encoding (as Llama tokenizers do).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    texts = list(texts)
    if kind == "bpe":
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        alphabet = pre_tokenizers.ByteLevel.alphabet()
    elif kind == "sentencepiece":
        tok = Tokenizer(models.BPE(unk_token="<unk>", fuse_unk=True))
        tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first")
        tok.decoder = decoders.Metaspace(replacement="▁", prepend_scheme="first")
        alphabet = sorted(set("".join(texts)) | {"▁"})
    else:
        raise ValueError(f"unknown tokenizer kind {kind!r}")
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS + ["<|user|>", "<|assistant|>", "<|system|>"],
                                  initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator(texts, trainer)
    if add_bos:
        bos = tok.token_to_id("<s>")
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", bos)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                 unk_token="<unk>")
    if chat_template:
        hf.chat_template = CHAT_TEMPLATE
    return hf


def tiny_llama(tokenizer, hidden: int = 32, layers: int = 2, heads: int = 2, intermediate: int | None = None,
               max_positions: int = 1024, seed: int = 0, tie_word_embeddings: bool = False):
    """A freshly initialised LlamaForCausalLM sized for tests (fp32, eager-free: sdpa attention)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate or hidden * 2,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=max_positions, bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      tie_word_embeddings=tie_word_embeddings)
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg)


SAMPLE_TEXTS = [
    "The movie was great and the acting was wonderful.",
    "The plot was boring and the ending felt weak.",
    "I loved the music, the story and the cast.",
    "Honestly the script was dull but the scenes were lovely.",
    "Hello there! How are you today? I am fine, thanks.",
    "Numbers like 12345 and symbols like #@! appear too.",
] * 4


def save_tiny_model(path, kind: Literal["bpe", "sentencepiece"] = "bpe", hidden: int = 32, layers: int = 2,
                    seed: int = 0, texts: Iterable[str] | None = None, vocab_size: int = 384):
    """Write a tiny model + tokenizer to ``path`` in HF format; returns (model, tokenizer)."""
    tok = tiny_tokenizer(texts or SAMPLE_TEXTS, kind=kind, vocab_size=vocab_size)
    model = tiny_llama(tok, hidden=hidden, layers=layers, seed=seed)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model, tok
