"""Read JSONL / JSON-array files (optionally gzipped) into typed examples.

Policy: structural problems fail fast with a ``DataError`` naming the file, the line (JSONL)
or record (JSON array), the field, and what to do — a file that is half unreadable should be
fixed, not silently trained on. Records that are well formed but carry no training signal
(chosen identical to rejected) are skipped with a logged warning; ``prefalign data check``
lists every skip and every bad line.
"""
from __future__ import annotations

import gzip
import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from prefalign.data.formats import FORMATS, Parsed, RecordError, detect_format
from prefalign.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["PreferenceExample", "SFTExample", "PromptExample", "FORMATS", "detect_format", "read_records",
           "load_preferences", "load_sft", "load_prompts", "parse_file", "ParsedFile"]


@dataclass
class PreferenceExample:
    """A preference pair. Chat data: prompt is a list of {role, content}; chosen/rejected the assistant turn(s)."""
    prompt: str | list[dict]
    chosen: str | list[dict]
    rejected: str | list[dict]
    margin: float | None = None
    source: str = ""          # "file:line" (JSONL) or "file[index]" (JSON array)


@dataclass
class SFTExample:
    """A supervised example. For {text} records prompt is None and completion holds the text."""
    prompt: str | list[dict] | None
    completion: str | list[dict]
    source: str = ""


@dataclass
class PromptExample:
    """A prompt for sampling (PPO, `prefalign pairs`)."""
    prompt: str | list[dict]
    source: str = ""


# --------------------------------------------------------------------------- reading

def _where(path: Path, n: int, array: bool) -> dict:
    """DataError location keywords: JSONL gives a line; a JSON array gives a record index."""
    return {"path": f"{path}, record {n}", "line": None} if array else {"path": str(path), "line": n}


def _read_text(path: Path) -> str:
    """The file's text, or a DataError saying why it cannot be read as UTF-8 text."""
    if not path.exists():
        raise DataError("file does not exist; check the path.", path=str(path))
    if path.is_dir():
        raise DataError("is a directory; give a .jsonl, .jsonl.gz or .json file.", path=str(path))
    try:
        raw = path.read_bytes()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
        elif path.suffix == ".gz":
            raise DataError("ends in .gz but is not gzip-compressed; rename or recompress it.", path=str(path))
    except OSError as e:
        raise DataError(f"cannot be read: {e.strerror or e}.", path=str(path)) from None
    except EOFError:
        raise DataError("is a truncated gzip file; copy it again.", path=str(path)) from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise DataError(f"is not UTF-8 text (byte {e.start}); convert it to UTF-8 "
                        "(e.g. `iconv -f latin1 -t utf-8`) or check that it is a data file.",
                        path=str(path), line=line) from None
    if "\x00" in text:
        line = text[:text.index("\x00")].count("\n") + 1
        raise DataError("holds binary data (NUL bytes); give a JSONL or JSON text file.", path=str(path), line=line)
    if not text.strip():
        raise DataError("is empty; it needs one JSON object per line (JSONL) or a JSON array of objects.",
                        path=str(path))
    return text


def scan_records(path) -> tuple[list[tuple[int, dict]], list[DataError], bool]:
    """Every record that parses, every line or record that does not, and whether it was a JSON array.

    File-level problems (missing, unreadable, not UTF-8, empty, invalid JSON array) raise.
    JSONL blank lines are ignored. Numbers are lines for JSONL and 0-based indices for arrays.
    """
    path = Path(path)
    text = _read_text(path)
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"is not valid JSON: {e.msg} (column {e.colno}).", path=str(path), line=e.lineno) from None
        if not isinstance(data, list):  # e.g. "[1] [2]" cannot reach here; kept for clarity
            raise DataError("must be a JSON array of objects.", path=str(path))
        records, errors = [], []
        for i, obj in enumerate(data):
            if isinstance(obj, dict):
                records.append((i, obj))
            else:
                errors.append(DataError(f"is {_kind(obj)}; a JSON array must hold one object per record.",
                                        **_where(path, i, True)))
        return records, errors, True
    records, errors = [], []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            hint = " (a pretty-printed JSON object? put one object per line, or wrap objects in a JSON array)" \
                if n == 1 and line.strip() == "{" else ""
            errors.append(DataError(f"is not valid JSON: {e.msg} (column {e.colno}){hint}.", path=str(path), line=n))
            continue
        if isinstance(obj, dict):
            records.append((n, obj))
        else:
            errors.append(DataError(f"is {_kind(obj)}; each JSONL line must be one JSON object {{...}}.",
                                    path=str(path), line=n))
    return records, errors, False


def _kind(obj) -> str:
    return {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "null"}.get(
        type(obj), "a JSON number")


def read_records(path) -> list[tuple[int, dict]]:
    """(line or index, record) for every record; the first bad line raises its DataError."""
    records, errors, _ = scan_records(path)
    if errors:
        raise errors[0]
    return records


# --------------------------------------------------------------------------- parsing

@dataclass
class ParsedFile:
    """A file read record by record: what each format made of it, and what went wrong where."""
    path: str
    array: bool
    n_records: int                                     # non-blank JSONL lines or array elements
    formats: Counter                                   # format name -> records
    parsed: list[tuple[int, str, Parsed]]              # (line or index, format, parsed record)
    errors: list[DataError]                            # every record that cannot be used

    def source(self, n: int) -> str:
        return f"{self.path}[{n}]" if self.array else f"{self.path}:{n}"


def _check_forced(data_format: Optional[str]) -> None:
    if data_format is not None and data_format not in FORMATS:
        raise DataError(f"unknown data format `{data_format}`; choose one of: {', '.join(FORMATS)}.",
                        field="data_format")


def parse_file(path, data_format: Optional[str] = None) -> ParsedFile:
    """Read and parse every record, collecting (not raising) per-record errors.

    Without ``data_format`` each record's format is detected; a file whose records fall into
    more than one format gets an error on the first odd record (forcing a format fixes that
    when the records really are one format).
    """
    _check_forced(data_format)
    path = Path(path)
    records, scan_errors, array = scan_records(path)
    errors: list[tuple[int, DataError]] = [(e.line or 0, e) for e in scan_errors]
    detected: list[tuple[int, str, dict]] = []
    for n, record in records:
        try:
            detected.append((n, data_format or detect_format(record), record))
        except RecordError as e:
            errors.append((n, DataError(str(e), **_where(path, n, array), field=e.field)))
    formats = Counter(name for _, name, _ in detected)
    majority = formats.most_common(1)[0][0] if formats else None
    parsed = []
    for n, name, record in detected:
        try:
            parsed.append((n, name, _parse_one(record, name, majority, formats)))
        except RecordError as e:
            errors.append((n, DataError(str(e), **_where(path, n, array), field=e.field)))
    errors.sort(key=lambda item: item[0])
    return ParsedFile(str(path), array, len(records) + len(scan_errors), formats, parsed, [e for _, e in errors])


def _parse_one(record: dict, name: str, majority: str, formats: Counter) -> Parsed:
    """One record through its format's parser; every problem becomes a RecordError."""
    if name != majority:
        raise RecordError(f"is in format `{name}` but most records are `{majority}` ({formats[majority]} of "
                          f"{sum(formats.values())}); a file holds one format. Fix this record, or force a "
                          "format with --data-format if the records really are alike.")
    fmt = FORMATS[name]
    missing = [k for k in fmt.keys if k not in record]
    if missing:
        raise RecordError(f"is missing key(s) {missing} needed by format `{name}` (e.g. {fmt.example}); "
                          f"the record has keys {sorted(record)}.", missing[0])
    try:
        return fmt.parse(record)
    except RecordError as e:
        raise RecordError(f"{str(e).rstrip('.')} (format `{name}`).", e.field) from None


# --------------------------------------------------------------------------- loaders

KIND_NAMES = {"preference": "preference pairs", "sft": "supervised examples", "prompt": "prompts"}


def _load(path, data_format: Optional[str], wanted: tuple[str, ...], what: str) -> ParsedFile:
    """Parse a file, raise its first error, and check its format can give ``what``."""
    pf = parse_file(path, data_format)
    if pf.errors:
        more = f" ({len(pf.errors) - 1} more problem(s); `prefalign data check --data {path}` lists them all)" \
            if len(pf.errors) > 1 else ""
        raise _with_suffix(pf.errors[0], more) if more else pf.errors[0]
    for name in pf.formats:
        if FORMATS[name].kind not in wanted:
            fit = [n for n, f in FORMATS.items() if f.kind in wanted]
            raise DataError(f"holds `{name}` records, which give no {what}; use a file in one of the formats "
                            f"{', '.join(fit)} (see `prefalign data check`).", path=str(path))
    skipped = Counter(p.skip for _, _, p in pf.parsed if p.skip)
    for reason, count in skipped.items():
        log.warning("%s: skipped %d record(s): %s", path, count, reason)
    return pf


def _with_suffix(err: DataError, suffix: str) -> DataError:
    """The same error with a note appended (keeps path/line/field attributes)."""
    new = DataError.__new__(DataError)
    Exception.__init__(new, str(err) + suffix)
    new.path, new.line, new.field = err.path, err.line, err.field
    return new


def _nonempty(examples: list, pf: ParsedFile, what: str) -> list:
    """A file whose every record was skipped trains nothing: say so, and why, before any model loads."""
    if not examples:
        reasons = sorted({p.skip for _, _, p in pf.parsed if p.skip})
        why = f" ({'; '.join(reasons)})" if reasons else ""
        raise DataError(f"gives no {what}: all {pf.n_records} record(s) were skipped{why}.", path=pf.path)
    return examples


def load_preferences(path, data_format: Optional[str] = None) -> list[PreferenceExample]:
    """Preference pairs from explicit, implicit, hh or conversational records (identical pairs skipped)."""
    pf = _load(path, data_format, ("preference",), "preference pairs")
    return _nonempty([PreferenceExample(p.fields["prompt"], p.fields["chosen"], p.fields["rejected"],
                                        p.fields["margin"], source=pf.source(n))
                      for n, _, p in pf.parsed if not p.skip], pf, "preference pairs")


def load_sft(path, data_format: Optional[str] = None) -> list[SFTExample]:
    """Supervised examples from completion, text or messages records; preference records give
    (prompt, chosen), the usual SFT step before DPO on the same data."""
    pf = _load(path, data_format, ("sft", "preference"), "supervised examples")
    out = []
    for n, _, p in pf.parsed:
        if "chosen" in p.fields:
            if not p.skip:
                out.append(SFTExample(p.fields["prompt"], p.fields["chosen"], source=pf.source(n)))
        else:
            out.append(SFTExample(p.fields["prompt"], p.fields["completion"], source=pf.source(n)))
    return _nonempty(out, pf, "supervised examples")


def load_prompts(path, data_format: Optional[str] = None) -> list[PromptExample]:
    """Prompts from any record with a prompt: prompt-only, completion, messages (all turns before
    the final assistant reply) and every preference format. {text} records have none."""
    pf = _load(path, data_format, ("prompt", "sft", "preference"), "prompts")
    if "text" in pf.formats:
        raise DataError("holds {text} records, which have no prompt; give {prompt} records "
                        '(e.g. {"prompt": "Write a haiku."}).', path=str(path))
    return [PromptExample(p.fields["prompt"], source=pf.source(n)) for n, _, p in pf.parsed]
