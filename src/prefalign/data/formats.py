"""The record formats prefalign reads, detected per record, in an explicit registry.

Each format turns one JSON object into one example. A format's parser raises ``RecordError``
(message + field) for a record it cannot use; the reader adds the file and line. A parser may
also return a ``Parsed`` with a ``skip`` reason (the record is valid JSON of the right shape but
carries no training signal, e.g. chosen identical to rejected) or a ``note`` (the record was
read, but in a way worth reporting, e.g. an HH pair whose dialogues differ before the last turn) or a
``warn`` (the record was read, but probably not as its author meant: a prompt with a chosen reply
and no rejected one looks like a preference pair missing a field).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Optional

HH_HUMAN = "\n\nHuman:"
HH_ASSISTANT = "\n\nAssistant:"


class RecordError(ValueError):
    """A record that does not fit its format; ``field`` names the offending key."""

    def __init__(self, message: str, field: Optional[str] = None):
        super().__init__(message)
        self.field = field


@dataclass
class Parsed:
    """What a format parser makes of one record: the normalised fields, or a skip reason."""
    fields: dict[str, Any]
    skip: Optional[str] = None
    note: Optional[str] = None
    warn: Optional[str] = None   # read, but probably not what the author meant (data check warns)


# --------------------------------------------------------------------------- field checks

def _text(record: dict, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str):
        raise RecordError(f"must be a string, got {_type_name(value)}.", key)
    if value == "":
        raise RecordError("is empty; every text field needs some text (drop the record or fill it in).", key)
    return value


def _messages(value: Any, key: str) -> list[dict]:
    """A list of {role, content} messages, checked message by message."""
    if not isinstance(value, list) or not value:
        raise RecordError(f"must be a non-empty list of {{role, content}} messages, got {_type_name(value)}.", key)
    for i, m in enumerate(value):
        if not isinstance(m, dict) or "role" not in m or "content" not in m:
            got = sorted(m) if isinstance(m, dict) else _type_name(m)
            raise RecordError(f"each message needs `role` and `content`; got {got}.", f"{key}[{i}]")
        if not isinstance(m["role"], str) or not isinstance(m["content"], str):
            raise RecordError("`role` and `content` must be strings.", f"{key}[{i}]")
    return value


def _text_or_messages(record: dict, key: str, chat: bool):
    return _messages(record.get(key), key) if chat else _text(record, key)


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "an object", list: "a list", bool: "a boolean", str: "a string"}.get(type(value), type(value).__name__)


def _margin(record: dict) -> Optional[float]:
    if record.get("margin") is None:
        return None
    m = record["margin"]
    if isinstance(m, bool) or not isinstance(m, (int, float)) or not math.isfinite(m):
        raise RecordError(f"must be a finite number when present, got {m!r}.", "margin")
    return float(m)


def _is_chat(record: dict, keys: tuple[str, ...]) -> bool:
    """Whether the given fields hold message lists (True) or text (False); mixing is an error."""
    kinds = {k: isinstance(record.get(k), list) for k in keys if k in record}
    if len(set(kinds.values())) > 1:
        lists = [k for k, v in kinds.items() if v]
        raise RecordError(f"{', '.join(lists)} hold message lists but the other fields hold text; "
                          "use text everywhere or messages everywhere.", lists[0])
    return any(kinds.values())


# --------------------------------------------------------------------------- prefix splitting

def split_implicit(chosen: str, rejected: str) -> tuple[str, str, str]:
    """Split the shared prompt off two texts: the longest common prefix, backed off to the start
    of a whitespace run so the prompt ends at a word boundary and each completion starts with its
    own whitespace (" yes" / " no": how BPE vocabularies store words). Both completions stay
    non-empty; the prompt may be empty when the texts share no word."""
    k = 0
    limit = min(len(chosen), len(rejected))
    while k < limit and chosen[k] == rejected[k]:
        k += 1
    # A completion must keep at least one character, so the split lies before the shorter end.
    k = min(k, limit - 1)
    while k > 0 and not chosen[k].isspace():
        k -= 1
    while k > 0 and chosen[k - 1].isspace():
        k -= 1
    return chosen[:k], chosen[k:], rejected[k:]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str, Optional[str]]:
    """Split Anthropic HH dialogues at the last "\\n\\nAssistant:" turn both share.

    The prompt keeps everything through that marker; the completions are what follows (they
    start with the space after the colon). A few real pairs differ before the last turn (one
    dialogue has an extra turn); those are still split at the last shared marker, so one
    completion spans several turns, and a note says so.
    """
    k = 0
    while k < min(len(chosen), len(rejected)) and chosen[k] == rejected[k]:
        k += 1
    last = chosen[:k].rfind(HH_ASSISTANT)
    if last < 0:
        raise RecordError('chosen and rejected share no "\\n\\nAssistant:" turn, so there is no common '
                          "prompt; check the pair or use --data-format implicit.", "rejected")
    cut = last + len(HH_ASSISTANT)
    completions = chosen[cut:], rejected[cut:]
    note = None
    if any(HH_ASSISTANT in c for c in completions):
        note = "dialogues differ before the last Assistant turn (split at the last shared turn)"
    return chosen[:cut], completions[0], completions[1], note


def split_messages(chosen: list[dict], rejected: list[dict]) -> tuple[list, list, list]:
    """Implicit-prompt chat pairs: the shared leading messages are the prompt."""
    k = 0
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
        k += 1
    return chosen[:k], chosen[k:], rejected[k:]


def _last_assistant(messages: list[dict], key: str) -> int:
    """Index of the final assistant message, which must close the conversation."""
    if messages[-1]["role"] != "assistant":
        raise RecordError("the last message must be the assistant's reply (the part that is trained).", key)
    return len(messages) - 1


# --------------------------------------------------------------------------- parsers

def _pair(prompt, chosen, rejected, record, note=None) -> Parsed:
    fields = {"prompt": prompt, "chosen": chosen, "rejected": rejected, "margin": _margin(record)}
    skip = "chosen identical to rejected" if chosen == rejected else None
    return Parsed(fields, skip=skip, note=note)


def parse_explicit(record: dict) -> Parsed:
    return _pair(_text(record, "prompt"), _text(record, "chosen"), _text(record, "rejected"), record)


def parse_implicit(record: dict) -> Parsed:
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    if chosen == rejected:
        return _pair("", chosen, rejected, record)
    return _pair(*split_implicit(chosen, rejected), record)


def parse_hh(record: dict) -> Parsed:
    chosen, rejected = _text(record, "chosen"), _text(record, "rejected")
    for key, text in (("chosen", chosen), ("rejected", rejected)):
        if HH_ASSISTANT not in text:
            raise RecordError('has no "\\n\\nAssistant:" turn; this is not an HH dialogue '
                              "(use --data-format implicit for plain text pairs).", key)
    if chosen == rejected:
        return _pair(chosen, chosen, rejected, record)
    prompt, c, r, note = split_hh(chosen, rejected)
    return _pair(prompt, c, r, record, note)


def parse_conversational(record: dict) -> Parsed:
    chosen, rejected = _messages(record.get("chosen"), "chosen"), _messages(record.get("rejected"), "rejected")
    if "prompt" in record:
        return _pair(_messages(record["prompt"], "prompt"), chosen, rejected, record)
    if chosen == rejected:
        return _pair([], chosen, rejected, record)
    return _pair(*split_messages(chosen, rejected), record)


def parse_completion(record: dict) -> Parsed:
    chat = _is_chat(record, ("prompt", "completion"))
    return Parsed({"prompt": _text_or_messages(record, "prompt", chat),
                   "completion": _text_or_messages(record, "completion", chat)})


def parse_text(record: dict) -> Parsed:
    return Parsed({"prompt": None, "completion": _text(record, "text")})


def parse_messages(record: dict) -> Parsed:
    messages = _messages(record.get("messages"), "messages")
    last = _last_assistant(messages, "messages")
    return Parsed({"prompt": messages[:last], "completion": messages[last:]})


def parse_prompt(record: dict) -> Parsed:
    chat = isinstance(record.get("prompt"), list)
    half = [k for k in ("chosen", "rejected") if k in record]
    warn = None
    if len(half) == 1:
        other = "rejected" if half == ["chosen"] else "chosen"
        warn = f"have `prompt` and `{half[0]}` but no `{other}`"
    return Parsed({"prompt": _text_or_messages(record, "prompt", chat)}, warn=warn)


@dataclass(frozen=True)
class RecordFormat:
    """One data format: what it holds, the keys it needs, an example line, and its parser."""
    kind: str                       # "preference", "sft" or "prompt"
    keys: tuple[str, ...]           # keys a record must have
    example: str                    # one JSONL line, for docs and error messages
    parse: Callable[[dict], Parsed]


FORMATS: dict[str, RecordFormat] = {
    "explicit": RecordFormat("preference", ("prompt", "chosen", "rejected"),
                             '{"prompt": "2+2=", "chosen": " 4", "rejected": " 5", "margin": 1.0}', parse_explicit),
    "implicit": RecordFormat("preference", ("chosen", "rejected"),
                             '{"chosen": "Q: 2+2? A: 4", "rejected": "Q: 2+2? A: 5"}', parse_implicit),
    "hh": RecordFormat("preference", ("chosen", "rejected"),
                       '{"chosen": "\\n\\nHuman: Hi\\n\\nAssistant: Hello!", '
                       '"rejected": "\\n\\nHuman: Hi\\n\\nAssistant: Go away."}', parse_hh),
    "conversational": RecordFormat(
        "preference", ("chosen", "rejected"),
        '{"prompt": [{"role": "user", "content": "Hi"}], "chosen": [{"role": "assistant", "content": "Hello!"}], '
        '"rejected": [{"role": "assistant", "content": "Go away."}]}', parse_conversational),
    "completion": RecordFormat("sft", ("prompt", "completion"),
                               '{"prompt": "Translate: chat", "completion": " cat"}', parse_completion),
    "text": RecordFormat("sft", ("text",), '{"text": "Once upon a time..."}', parse_text),
    "messages": RecordFormat(
        "sft", ("messages",),
        '{"messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]}',
        parse_messages),
    "prompt": RecordFormat("prompt", ("prompt",), '{"prompt": "Write a haiku about rain."}', parse_prompt),
}


# Every key a format reads: what --data-columns may map a source's columns onto.
RECORD_KEYS = ("prompt", "chosen", "rejected", "margin", "completion", "text", "messages")


def detect_format(record: dict) -> str:
    """The FORMATS name that fits ``record`` (raises RecordError when none does).

    Decided by keys first, then by value types: message lists make a record conversational,
    and {chosen, rejected} texts holding "\\n\\nHuman:" and "\\n\\nAssistant:" turns are HH.
    """
    if "chosen" in record and "rejected" in record:
        if _is_chat(record, ("prompt", "chosen", "rejected")):
            return "conversational"
        if "prompt" in record:
            return "explicit"
        texts = (record["chosen"], record["rejected"])
        if all(isinstance(t, str) and HH_HUMAN in t and HH_ASSISTANT in t for t in texts):
            return "hh"
        return "implicit"
    for name in ("completion", "messages", "text", "prompt"):
        if all(k in record for k in FORMATS[name].keys):
            return name
    known = "; ".join(f"{n}: {{{', '.join(f.keys)}}}" for n, f in FORMATS.items() if n != "hh")
    raise RecordError(f"no known format fits keys {sorted(record)}. Known formats need: {known}.")
