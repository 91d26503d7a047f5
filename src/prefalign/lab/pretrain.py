"""Data for the lab's tiny base model: a tokenizer trained on the corpus, and prefix prompts.

The demo pretrains a small Llama on generated reviews ({text} rows through the SFT stage), then
asks every method to continue short review prefixes, as DPO sec. 6.1 does with IMDb prefixes.
"""
from __future__ import annotations

import random
from typing import Iterable, Sequence

from prefalign.lab.corpus import Review
from prefalign.tiny import tiny_tokenizer


def build_tokenizer(texts: Iterable[str], vocab_size: int = 3000, add_bos: bool = True):
    """Byte-level BPE trained on ``texts`` (PreTrainedTokenizerFast).

    Specials: <pad>, <s> (bos), </s> (eos), <unk>, plus the chat-role markers of prefalign.tiny.
    add_bos prepends <s> to every encoding, so a 2-token prompt still has a start-of-review cue.
    Byte-level: any text encodes, so nothing is ever <unk>.
    """
    return tiny_tokenizer(texts, kind="bpe", vocab_size=vocab_size, add_bos=add_bos)


def _content_ids(tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without the special tokens the tokenizer adds (bos)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def split_prefix(tokenizer, text: str, k: int) -> tuple[str, str] | None:
    """Cut ``text`` after its first k tokens: (prompt, continuation) with prompt + continuation == text.

    None when the cut is not clean: the decoded prefix is not a prefix of the text, or it does
    not re-encode to the same k ids (BPE merges across the cut), or nothing is left to continue.
    """
    ids = _content_ids(tokenizer, text)
    if len(ids) <= k:
        return None
    prompt = tokenizer.decode(ids[:k])
    if not text.startswith(prompt) or _content_ids(tokenizer, prompt) != ids[:k]:
        return None
    continuation = text[len(prompt):]
    return (prompt, continuation) if continuation.strip() else None


def prompts_from_reviews(reviews: Sequence[Review | str], tokenizer, min_tokens: int = 2, max_tokens: int = 8,
                         seed: int = 0) -> list[dict]:
    """{prompt, completion} rows: each review cut after a uniform random 2..8 of its tokens.

    Reviews whose cut is not clean (see ``split_prefix``) or that are too short are skipped, so
    the result can be shorter than ``reviews``. Seeded and independent of the tokenizer's speed.
    """
    if not 1 <= min_tokens <= max_tokens:
        raise ValueError(f"need 1 <= min_tokens <= max_tokens, got {min_tokens}, {max_tokens}")
    rng = random.Random(seed)
    rows = []
    for review in reviews:
        text = review.text if isinstance(review, Review) else review
        cut = split_prefix(tokenizer, text, rng.randint(min_tokens, max_tokens))
        if cut is not None:
            rows.append({"prompt": cut[0], "completion": cut[1]})
    return rows
