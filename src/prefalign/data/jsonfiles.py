"""JSONL and JSON-array files (optionally gzipped) as numbered records, with the reasons a
file or a line cannot be read: missing, a directory, unreadable, not UTF-8, binary, empty,
invalid JSON, not an object. Numbers are lines for JSONL and 0-based indices for arrays.
"""
from __future__ import annotations

import gzip
import json
from pathlib import Path

from prefalign.errors import DataError

__all__ = ["read_text", "scan_records"]


def _where(path: Path, n: int, array: bool) -> dict:
    """DataError location keywords: JSONL gives a line; a JSON array gives a record index."""
    return {"path": f"{path}, record {n}", "line": None} if array else {"path": str(path), "line": n}


def read_text(path: Path) -> str:
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


def scan_records(path) -> tuple[list[tuple[int, dict]], list[tuple[int, DataError]], bool]:
    """Every record that parses, every (number, error) of a line or element that does not, and
    whether the file was a JSON array.

    File-level problems (missing, unreadable, not UTF-8, empty, invalid JSON array) raise.
    JSONL blank lines are ignored.
    """
    path = Path(path)
    text = read_text(path)
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
                errors.append((i, DataError(f"is {_kind(obj)}; a JSON array must hold one object per record.",
                                            **_where(path, i, True))))
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
            errors.append((n, DataError(f"is not valid JSON: {e.msg} (column {e.colno}){hint}.",
                                        path=str(path), line=n)))
            continue
        if isinstance(obj, dict):
            records.append((n, obj))
        else:
            errors.append((n, DataError(f"is {_kind(obj)}; each JSONL line must be one JSON object {{...}}.",
                                        path=str(path), line=n)))
    return records, errors, False


def _kind(obj) -> str:
    return {list: "a JSON list", str: "a JSON string", bool: "a JSON boolean", type(None): "null"}.get(
        type(obj), "a JSON number")
