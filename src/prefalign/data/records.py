"""Read data sources (JSONL / JSON, Parquet, CSV, dataset folders, Hub ids: sources.py) into
typed examples.

Policy: structural problems fail fast with a ``DataError`` naming the file, the line (JSONL)
or record (JSON array), the field, and what to do — a file that is half unreadable should be
fixed, not silently trained on. Records that are well formed but carry no training signal
(chosen identical to rejected) are skipped with a logged warning; ``prefalign data check``
lists every skip and every bad line.
"""
from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass
from typing import Optional

from prefalign.data.formats import FORMATS, Parsed, RecordError, detect_format
from prefalign.data.jsonfiles import scan_records
from prefalign.data.sources import location, open_source
from prefalign.errors import DataError

log = logging.getLogger(__name__)

__all__ = ["PreferenceExample", "SFTExample", "PromptExample", "FORMATS", "detect_format", "read_records",
           "load_preferences", "load_sft", "load_prompts", "parse_file", "ParsedFile", "scan_records"]


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

def read_records(path, **source) -> list[tuple[int, dict]]:
    """(line or index, record) for every record of any source (see ``open_source``: files,
    dataset folders, Hub ids; ``columns`` renames theirs to ours); the first bad one raises."""
    src = open_source(path, **source)
    if src.errors:
        raise src.errors[0][1]
    return src.rows


# --------------------------------------------------------------------------- parsing

@dataclass
class ParsedFile:
    """A source read record by record: what each format made of it, and what went wrong where."""
    path: str                                          # the source's label: a path, or "org/name (split train)"
    container: str                                     # "JSONL", "JSON array", "Parquet", "CSV", "Hub dataset", ...
    numbered_by: str                                   # "line", "record" or "row"
    n_records: int                                     # non-blank JSONL lines, array elements or rows
    formats: Counter                                   # format name -> records
    parsed: list[tuple[int, str, Parsed]]              # (line or index, format, parsed record)
    errors: list[DataError]                            # every record that cannot be used

    @property
    def array(self) -> bool:
        """Records are numbered by index (JSON array, table, dataset), not by line."""
        return self.numbered_by != "line"

    def source(self, n: int) -> str:
        return f"{self.path}:{n}" if self.numbered_by == "line" else f"{self.path}[{n}]"

    def where(self, n: int) -> dict:
        """DataError location keywords for record ``n``."""
        return location(self.path, self.numbered_by, n)


def _check_forced(data_format: Optional[str]) -> None:
    if data_format is not None and data_format not in FORMATS:
        raise DataError(f"unknown data format `{data_format}`; choose one of: {', '.join(FORMATS)}.",
                        field="data_format")


def parse_file(path, data_format: Optional[str] = None, **source) -> ParsedFile:
    """Read and parse every record of a source, collecting (not raising) per-record errors.

    ``source`` holds ``open_source``'s options (split, config, revision, columns). Without
    ``data_format`` each record's format is detected; a source whose records fall into more
    than one format gets an error on the first odd record (forcing a format fixes that when the
    records really are one format).
    """
    _check_forced(data_format)
    src = open_source(path, **source)
    errors: list[tuple[int, DataError]] = list(src.errors)
    detected: list[tuple[int, str, dict]] = []
    for n, record in src.rows:
        try:
            detected.append((n, data_format or detect_format(record), record))
        except RecordError as e:
            errors.append((n, DataError(str(e), **src.where(n), field=e.field)))
    formats = Counter(name for _, name, _ in detected)
    majority = formats.most_common(1)[0][0] if formats else None
    parsed = []
    for n, name, record in detected:
        try:
            parsed.append((n, name, _parse_one(record, name, majority, formats)))
        except RecordError as e:
            errors.append((n, DataError(str(e), **src.where(n), field=e.field)))
    errors.sort(key=lambda item: item[0])
    return ParsedFile(src.label, src.container, src.numbered_by, len(src.rows) + len(src.errors), formats, parsed,
                      [e for _, e in errors])


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


def half_pair_warning(count: int, warn: str) -> str:
    """What to say about records a parser flagged with ``Parsed.warn`` (formats.parse_prompt)."""
    return (f"{count} record(s) {warn}: they look like preference pairs missing a field, and are read as prompts "
            "only (the reply is ignored).")


def _load(path, data_format: Optional[str], wanted: tuple[str, ...], what: str, source: dict) -> ParsedFile:
    """Parse a source, raise its first error, and check its format can give ``what``."""
    pf = parse_file(path, data_format, **source)
    if pf.errors:
        more = f" ({len(pf.errors) - 1} more problem(s); `prefalign data check --data {path}` lists them all)" \
            if len(pf.errors) > 1 else ""
        raise _with_suffix(pf.errors[0], more) if more else pf.errors[0]
    warned = Counter(p.warn for _, _, p in pf.parsed if p.warn)
    for name in pf.formats:
        if FORMATS[name].kind not in wanted:
            fit = [n for n, f in FORMATS.items() if f.kind in wanted]
            half = "".join(f" {half_pair_warning(c, w)}" for w, c in warned.items())
            raise DataError(f"holds `{name}` records, which give no {what}; use a file in one of the formats "
                            f"{', '.join(fit)} (see `prefalign data check`).{half}", path=pf.path)
    skipped = Counter(p.skip for _, _, p in pf.parsed if p.skip)
    # A library that configures logging with disable_existing_loggers (alembic under MLflow, and
    # others) must not silence what the user's data needs them to hear.
    log.disabled = False
    for reason, count in skipped.items():
        log.warning("%s: skipped %d record(s): %s", pf.path, count, reason)
    for warn, count in warned.items():
        log.warning("%s: %s", pf.path, half_pair_warning(count, warn))
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


def load_preferences(path, data_format: Optional[str] = None, **source) -> list[PreferenceExample]:
    """Preference pairs from explicit, implicit, hh or conversational records (identical pairs skipped).
    ``path`` is any source and ``source`` its options (split, config, revision, columns: ``open_source``)."""
    pf = _load(path, data_format, ("preference",), "preference pairs", source)
    return _nonempty([PreferenceExample(p.fields["prompt"], p.fields["chosen"], p.fields["rejected"],
                                        p.fields["margin"], source=pf.source(n))
                      for n, _, p in pf.parsed if not p.skip], pf, "preference pairs")


def load_sft(path, data_format: Optional[str] = None, **source) -> list[SFTExample]:
    """Supervised examples from completion, text or messages records; preference records give
    (prompt, chosen), the usual SFT step before DPO on the same data."""
    pf = _load(path, data_format, ("sft", "preference"), "supervised examples", source)
    out = []
    for n, _, p in pf.parsed:
        if "chosen" in p.fields:
            if not p.skip:
                out.append(SFTExample(p.fields["prompt"], p.fields["chosen"], source=pf.source(n)))
        else:
            out.append(SFTExample(p.fields["prompt"], p.fields["completion"], source=pf.source(n)))
    return _nonempty(out, pf, "supervised examples")


def load_prompts(path, data_format: Optional[str] = None, *, text_only: bool = False,
                 **source) -> list[PromptExample]:
    """Prompts from any record with a prompt: prompt-only, completion, messages (all turns before
    the final assistant reply) and every preference format. {text} records have none.
    ``text_only``: a prompt given as a message list is an error (for samplers of plain text)."""
    pf = _load(path, data_format, ("prompt", "sft", "preference"), "prompts", source)
    if "text" in pf.formats:
        raise DataError("holds {text} records, which have no prompt; give {prompt} records "
                        '(e.g. {"prompt": "Write a haiku."}).', path=pf.path)
    for n, _, p in pf.parsed:
        if text_only and not isinstance(p.fields["prompt"], str):
            raise DataError("is a list of messages; this command needs text prompts (a string per record).",
                            **pf.where(n), field="prompt")
    return [PromptExample(p.fields["prompt"], source=pf.source(n)) for n, _, p in pf.parsed]
