"""Tokenise prompt + completion with an exact boundary, EOS once, BOS once, and honest truncation.

Layout of every sequence: ``input_ids = prompt_ids + completion_ids`` where the completion ends
with EOS (unless truncation cut its end). ``prompt_len`` marks the boundary; losses use only
tokens from ``prompt_len`` on.

The boundary. The prompt is encoded alone, then prompt + completion jointly. When the prompt's
ids are a prefix of the joint ids, the completion is the rest: exactly how the model sees the
text. When a BPE merge crosses the boundary (prompt "The movie was gr" + completion "eat":
jointly "▁great" is one token) they are not a prefix. We then keep the prompt ids exactly as
encoded alone and encode the completion on its own, because (1) every pair shares identical
prompt ids, which DPO's per-pair log-ratios and a reference cache rely on, and (2) at sampling
time the model starts from the prompt encoded alone, so training on that prefix matches
generation. To encode the completion "as a continuation" we put a special token in front of it
and drop that token: special tokens never merge, and SentencePiece-style tokenizers then do not
prepend the "▁" (a space) they add at the start of a text. No token shifts or is dropped: the
decoded ids are prompt + completion.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from prefalign.errors import ConfigError, DataError, ModelError

__all__ = ["Tokenized", "encode_prompt", "encode_prompt_completion", "encode_text", "encode_preference",
           "encode_sft", "fit_lengths"]


@dataclass
class Tokenized:
    """One sequence: prompt ids then completion ids (ending in EOS unless truncated)."""
    input_ids: list[int]      # prompt + completion (+ eos)
    prompt_len: int           # leading prompt tokens, masked out of completion losses
    prompt_cut: int = 0       # tokens removed from the prompt's start by truncation
    completion_cut: int = 0   # tokens removed from the completion's end (the EOS goes with them)

    @property
    def completion_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len:]


# --------------------------------------------------------------------------- helpers

def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _eos_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise ModelError("the tokenizer has no EOS token, so completions cannot be terminated; set `eos_token` "
                         "in tokenizer_config.json (or tokenizer.eos_token = ...) before training.")
    return tokenizer.eos_token_id


def _leading_specials(tokenizer) -> list[int]:
    """The ids the tokenizer puts before a text by itself (BOS for Llama-style tokenizers, else [])."""
    plain = _ids(tokenizer, "a")
    full = tokenizer("a")["input_ids"]
    if len(full) > len(plain) and full[len(full) - len(plain):] == plain:
        return full[:len(full) - len(plain)]
    return []  # only trailing specials (or none): prompts never get those


def _render_chat(tokenizer, messages: list[dict], generation_prompt: bool) -> str:
    if not getattr(tokenizer, "chat_template", None):
        raise ModelError("the data holds chat messages but the tokenizer has no chat template; use a chat/instruct "
                         "model's tokenizer or text data.")
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def _dedupe_bos(tokenizer, ids: list[int]) -> list[int]:
    """A template that writes BOS as text, tokenised by a tokenizer that adds BOS, doubles it."""
    bos = tokenizer.bos_token_id
    while bos is not None and len(ids) >= 2 and ids[0] == bos and ids[1] == bos:
        ids = ids[1:]
    return ids


def _continuation_ids(tokenizer, prompt_text: str, prompt_ids: list[int], completion: str) -> list[int]:
    """Completion ids that follow ``prompt_ids`` (``prompt_text`` encoded alone, no added specials)."""
    joint = _ids(tokenizer, prompt_text + completion)
    if joint[:len(prompt_ids)] == prompt_ids:
        return joint[len(prompt_ids):]
    # A merge crosses the boundary: encode the completion after a non-merging special token.
    anchor = tokenizer.eos_token or (tokenizer.all_special_tokens or [None])[0]
    if anchor is not None:
        anchored = _ids(tokenizer, anchor + completion)
        anchor_id = tokenizer.convert_tokens_to_ids(anchor)
        if anchored[:1] == [anchor_id]:
            return anchored[1:]
    return _ids(tokenizer, completion)


def _terminate(completion_ids: list[int], eos: int, chat: bool) -> list[int]:
    """EOS exactly once at the end. Chat templates close a turn with EOS and may add text after
    it (a newline); that tail is dropped so the completion ends where the turn ends."""
    if chat and eos in completion_ids:
        last = len(completion_ids) - 1 - completion_ids[::-1].index(eos)
        return completion_ids[:last + 1]
    return completion_ids if completion_ids[-1:] == [eos] else completion_ids + [eos]


def fit_lengths(prompt_len: int, completion_len: int, max_length: int,
                max_prompt_length: Optional[int] = None) -> tuple[int, int]:
    """(prompt tokens kept, completion tokens kept) under the budget.

    Nothing is cut when prompt + completion fit. Otherwise the prompt's start goes first, but
    only as far as needed and never below ``max_prompt_length`` (default max_length // 2):
    the end of the prompt is what the completion answers. Then the completion's end is cut.
    """
    mpl = max_length // 2 if max_prompt_length is None else max_prompt_length
    if max_length < 2 or not 0 < mpl < max_length:
        raise ConfigError(f"need 0 < --max-prompt-length ({mpl}) < --max-length ({max_length}) so that "
                          "every completion keeps at least one token.")
    prompt_keep = min(prompt_len, max(mpl, max_length - completion_len))
    return prompt_keep, min(completion_len, max_length - prompt_keep)


def _cut_prompt(ids: list[int], keep: int, lead: int) -> list[int]:
    """The last ``keep`` tokens of the prompt, keeping its ``lead`` leading specials (BOS) in front."""
    if keep >= len(ids):
        return ids
    lead = min(lead, keep)
    return ids[:lead] + ids[len(ids) - (keep - lead):] if keep > lead else ids[:keep]


def _n_lead(tokenizer, ids: list[int], specials: list[int]) -> int:
    if specials and ids[:len(specials)] == specials:
        return len(specials)
    return 1 if ids and tokenizer.bos_token_id is not None and ids[0] == tokenizer.bos_token_id else 0


# --------------------------------------------------------------------------- public API

@dataclass
class _Prompt:
    text: str              # the prompt as text (chat: rendered with the generation prompt)
    text_ids: list[int]    # ids of that text alone, no added specials: the prefix joint ids must share
    ids: list[int]         # what the model sees: leading specials (BOS once) + prompt tokens
    lead: int              # how many leading specials ids starts with (kept when truncating)


def _prompt_parts(tokenizer, prompt) -> _Prompt:
    if isinstance(prompt, list):
        text = _render_chat(tokenizer, prompt, generation_prompt=True)
        text_ids = _ids(tokenizer, text)
        ids = _dedupe_bos(tokenizer, text_ids)  # chat templates own their specials
        p = _Prompt(text, text_ids, ids, _n_lead(tokenizer, ids, []))
    else:
        lead, text_ids = _leading_specials(tokenizer), _ids(tokenizer, prompt)
        p = _Prompt(prompt, text_ids, lead + text_ids, len(lead))
    if not p.ids:  # an empty prompt and no BOS added: the first completion token would predict nothing
        p.ids, p.lead = [_conditioning_id(tokenizer)], 1
    return p


def _conditioning_id(tokenizer) -> int:
    """What an empty prompt is encoded as when the tokenizer adds no BOS (GPT-2, Qwen): its BOS token
    if it has one, else EOS (GPT-2's BOS and EOS are both <|endoftext|>, which starts its documents).
    Every completion token then has a token before it that predicts it, and is scored."""
    return tokenizer.bos_token_id if tokenizer.bos_token_id is not None else _eos_id(tokenizer)


def encode_prompt(tokenizer, prompt, max_prompt_length: Optional[int] = None) -> list[int]:
    """Prompt ids as the model sees them before generating: BOS once (when the tokenizer adds
    one), chat prompts rendered with the generation prompt; left-truncated to
    ``max_prompt_length`` keeping BOS in front."""
    p = _prompt_parts(tokenizer, prompt)
    return p.ids if max_prompt_length is None else _cut_prompt(p.ids, max_prompt_length, p.lead)


def _completion(tokenizer, prompt, completion, p: _Prompt, source: str) -> list[int]:
    """Completion ids (EOS-terminated) that follow the prompt's ids."""
    eos = _eos_id(tokenizer)
    if isinstance(prompt, list) != isinstance(completion, list):
        raise DataError("prompt and completion must both be text or both be message lists.", path=source or None)
    if not isinstance(completion, list):
        return _terminate(_continuation_ids(tokenizer, p.text, p.text_ids, completion), eos, chat=False)
    full = _render_chat(tokenizer, prompt + completion, generation_prompt=False)
    if not full.startswith(p.text):
        raise DataError("the chat template renders the prompt differently inside the full conversation, so the "
                        "completion boundary is unknown; check the template or give text data.",
                        path=source or None)
    return _terminate(_continuation_ids(tokenizer, p.text, p.text_ids, full[len(p.text):]), eos, chat=True)


def encode_prompt_completion(tokenizer, prompt, completion, max_length: int,
                             max_prompt_length: Optional[int] = None, source: str = "") -> Tokenized:
    """Prompt + completion (text, or chat messages rendered with the tokenizer's template)."""
    p = _prompt_parts(tokenizer, prompt)
    completion_ids = _completion(tokenizer, prompt, completion, p, source)
    return _assemble(p, completion_ids, len(completion_ids), max_length, max_prompt_length)


def _assemble(p: _Prompt, completion_ids, budget_completion_len, max_length, max_prompt_length) -> Tokenized:
    """Truncate as ``fit_lengths`` says, sizing the prompt cut by ``budget_completion_len``."""
    prompt_ids = p.ids
    prompt_keep, _ = fit_lengths(len(prompt_ids), budget_completion_len, max_length, max_prompt_length)
    kept_prompt = _cut_prompt(prompt_ids, prompt_keep, p.lead)
    completion_keep = min(len(completion_ids), max_length - len(kept_prompt))
    return Tokenized(kept_prompt + completion_ids[:completion_keep], len(kept_prompt),
                     prompt_cut=len(prompt_ids) - len(kept_prompt),
                     completion_cut=len(completion_ids) - completion_keep)


def encode_text(tokenizer, text: str, max_length: int) -> Tokenized:
    """Plain LM text ({text} records): BOS (if the tokenizer adds one) + text + EOS, end cut to fit."""
    lead = _leading_specials(tokenizer)
    body = _terminate(_ids(tokenizer, text), _eos_id(tokenizer), chat=False)
    keep = min(len(body), max_length - len(lead))
    return Tokenized(lead + body[:keep], len(lead), completion_cut=len(body) - keep)


def encode_sft(tokenizer, ex, max_length: int, max_prompt_length: Optional[int] = None) -> Tokenized:
    """An SFTExample: {text} when its prompt is None, else prompt + completion."""
    if ex.prompt is None:
        return encode_text(tokenizer, ex.completion, max_length)
    return encode_prompt_completion(tokenizer, ex.prompt, ex.completion, max_length, max_prompt_length,
                                    source=ex.source)


def encode_preference(tokenizer, ex, max_length: int,
                      max_prompt_length: Optional[int] = None) -> tuple[Tokenized, Tokenized]:
    """(chosen, rejected) with identical prompt ids: the prompt is cut once, for the longer completion."""
    p = _prompt_parts(tokenizer, ex.prompt)
    chosen = _completion(tokenizer, ex.prompt, ex.chosen, p, ex.source)
    rejected = _completion(tokenizer, ex.prompt, ex.rejected, p, ex.source)
    longest = max(len(chosen), len(rejected))
    return (_assemble(p, chosen, longest, max_length, max_prompt_length),
            _assemble(p, rejected, longest, max_length, max_prompt_length))
