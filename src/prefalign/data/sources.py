"""Open any data source as numbered records: JSONL / JSON files, Parquet and CSV files, a
``datasets`` ``save_to_disk`` folder, a local folder laid out like a Hub dataset repo, or a
Hub dataset id (``org/name``).

Everything above this module (format detection, parsing, ``data check``) sees the same thing
from every source: ``(number, record)`` rows, the per-row errors, and how to say where a row is
("file, line 3" for JSONL, "file, record 3" for a JSON array, "source, row 3" for tables and
datasets: rows count from 0, as ``ds[3]`` and ``df.iloc[3]``). Column names that differ from
ours are renamed here (``columns={"chosen": "response_a"}``).

Folders and Hub ids are read through the ``datasets`` library, imported only for them, so
reading JSONL stays quick and torch-free.
"""
from __future__ import annotations

import csv
import difflib
import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from prefalign.data.formats import RECORD_KEYS
from prefalign.data.jsonfiles import read_text, scan_records
from prefalign.errors import DataError

__all__ = ["SourceRows", "location", "open_source", "source_options", "source_digest", "parse_columns"]

HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")
FILE_SUFFIXES = (".jsonl", ".json", ".gz", ".parquet", ".csv")
# Data files the `datasets` library reads from a folder laid out like a Hub dataset repo.
FOLDER_DATA = (".jsonl", ".json", ".jsonl.gz", ".json.gz", ".parquet", ".csv", ".arrow", ".txt")
EVAL_SPLITS = ("test", "validation", "valid", "dev", "eval")


@dataclass
class SourceRows:
    """Every record a source holds, numbered, and the rows that could not be read as records."""
    label: str                       # the path, or "org/name (split train)": what messages call it
    container: str                   # "JSONL", "JSON array", "Parquet", "CSV", "saved dataset", ...
    numbered_by: str                 # "line" (JSONL), "record" (JSON array) or "row" (tables, datasets)
    rows: list[tuple[int, dict]]     # (line or index, record)
    errors: list[tuple[int, DataError]]   # (line or index, why that row is not a record)

    def where(self, n: int) -> dict:
        return location(self.label, self.numbered_by, n)


def location(label: str, numbered_by: str, n: int) -> dict:
    """DataError location keywords for record ``n``: "file, line 3" or "label, row 3"."""
    if numbered_by == "line":
        return {"path": label, "line": n}
    return {"path": f"{label}, {numbered_by} {n}", "line": None}


# --------------------------------------------------------------------------- options

def parse_columns(value: Any) -> dict[str, str]:
    """``"chosen=response_a,rejected=response_b"`` or a mapping -> {our key: their column}.

    Raises ValueError with a message for people (the config turns it into a ConfigError)."""
    if value is None or value == "" or value == {}:
        return {}
    if isinstance(value, str):
        pairs = [p.strip() for p in value.split(",") if p.strip()]
        if any(p.count("=") != 1 for p in pairs):
            raise ValueError(f"give OURS=THEIRS pairs separated by commas (e.g. chosen=response_a,"
                             f"rejected=response_b), got {value!r}")
        items = [tuple(s.strip() for s in p.split("=")) for p in pairs]
    elif isinstance(value, dict):
        items = [(str(k), v) for k, v in value.items()]
    else:
        raise ValueError(f"must be OURS=THEIRS pairs or a mapping, got {value!r}")
    out: dict[str, str] = {}
    for ours, theirs in items:
        if ours not in RECORD_KEYS:
            close = difflib.get_close_matches(ours, RECORD_KEYS, n=1)
            hint = f" (did you mean `{close[0]}`?)" if close else ""
            raise ValueError(f"`{ours}` is not a field prefalign reads{hint}; map columns onto "
                             f"{', '.join(RECORD_KEYS)}")
        if not isinstance(theirs, str) or not theirs:
            raise ValueError(f"`{ours}` must map to a column name, got {theirs!r}")
        if ours in out:
            raise ValueError(f"`{ours}` is mapped twice")
        out[ours] = theirs
    return out


def source_options(cfg, eval: bool = False) -> dict[str, Any]:
    """The keyword arguments of ``open_source`` (and every ``load_*``) that a config sets.

    ``eval=True`` is for --eval-data: its split is --eval-data-split (default: a test or
    validation split)."""
    split = getattr(cfg, "eval_data_split", None) if eval else getattr(cfg, "data_split", None)
    return {"split": split, "config": getattr(cfg, "data_config", None),
            "revision": getattr(cfg, "data_revision", None), "columns": getattr(cfg, "data_columns", None),
            "prefer": EVAL_SPLITS if eval else ("train",)}


# --------------------------------------------------------------------------- opening

def open_source(spec, *, split: Optional[str] = None, config: Optional[str] = None,
                revision: Optional[str] = None, columns: Any = None,
                prefer: tuple[str, ...] = ("train",)) -> SourceRows:
    """Read ``spec`` (a path or a Hub id) into numbered records, columns renamed to ours.

    ``split``, ``config`` and ``revision`` apply to dataset folders and Hub ids (single files
    have one table); without ``split`` the first of ``prefer`` that exists is used, or the only
    split. Source-level problems (missing, unreadable, not cached offline) raise DataError;
    rows that are not records are returned in ``errors``.
    """
    mapping = parse_columns(columns)
    path = Path(spec)
    if path.is_file():
        src = _open_file(path)
    elif path.is_dir():
        src = _open_folder(path, split, config, prefer)
    elif HUB_ID.match(str(spec)) and not str(spec).lower().endswith(FILE_SUFFIXES):
        src = _open_hub(str(spec), split, config, revision, prefer)
    else:
        raise DataError("file does not exist; check the path (a Hub dataset id looks like org/name).",
                        path=str(spec))
    src = _renamed(src, mapping) if mapping else src
    if src.container == "CSV":  # after renaming: a mapped margin column is a number too
        src.rows = [(n, {**r, "margin": _csv_number(r["margin"])} if "margin" in r else r) for n, r in src.rows]
    return src


def _open_file(path: Path) -> SourceRows:
    with open(path, "rb") as f:
        head = f.read(4)
    if head == b"PAR1" or path.suffix == ".parquet":
        return _open_parquet(path)
    if path.suffix == ".csv" or path.name.endswith(".csv.gz"):
        return _open_csv(path)
    rows, errors, array = scan_records(path)
    return SourceRows(str(path), "JSON array" if array else "JSONL", "record" if array else "line", rows, errors)


def _open_parquet(path: Path) -> SourceRows:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError("is a Parquet file; reading it needs pyarrow (`pip install datasets`, which brings it).",
                        path=str(path)) from None
    try:
        table = pq.read_table(path)
    except (OSError, ValueError) as e:  # pyarrow.ArrowInvalid is a ValueError
        raise DataError(f"is not a readable Parquet file ({str(e).splitlines()[0]}); copy it again or give a "
                        "JSONL file.", path=str(path)) from None
    if table.num_rows == 0:
        raise DataError("is an empty Parquet table (no rows).", path=str(path))
    return SourceRows(str(path), "Parquet", "row", list(enumerate(table.to_pylist())), [])


def _open_csv(path: Path) -> SourceRows:
    """CSV with a header row; every cell is text except ``margin`` (a number, or empty for none)."""
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""))  # the UTF-8 / gzip / empty checks of JSONL
    src = SourceRows(str(path), "CSV", "row", [], [])
    if not reader.fieldnames or not any(reader.fieldnames):
        raise DataError("has no header row; the first line must name the columns (e.g. prompt,chosen,rejected).",
                        path=str(path))
    for i, row in enumerate(reader):
        if None in row:
            src.errors.append((i, DataError(f"has {len(reader.fieldnames) + len(row[None])} cells but the header "
                                            f"names {len(reader.fieldnames)} columns; quote cells that hold commas.",
                                            **src.where(i))))
            continue
        src.rows.append((i, row))
    if not src.rows and not src.errors:
        raise DataError("has a header but no rows.", path=str(path))
    return src


def _csv_number(cell: Optional[str]):
    if cell is None or not cell.strip():
        return None
    try:
        return float(cell)
    except ValueError:
        return cell  # the record check says what is wrong with it


def _open_folder(path: Path, split, config, prefer) -> SourceRows:
    saved = (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()
    if not saved and not any(p.is_file() and p.name.lower().endswith(FOLDER_DATA) and not _hidden(p, path)
                             for p in path.rglob("*")):
        raise DataError("is a directory with no data files: give a .jsonl, .json, .parquet or .csv file, a "
                        "`datasets` save_to_disk folder, or a folder laid out like a Hub dataset repo "
                        "(e.g. train.jsonl, data/test-00000-of-00001.parquet).", path=str(path))
    datasets = _datasets(str(path))
    if saved:
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError) as e:
            raise DataError(f"looks like a `datasets` save_to_disk folder but cannot be loaded: {_first_line(e)}",
                            path=str(path)) from None
        return _from_dataset(loaded, str(path), "saved dataset (save_to_disk)", split, prefer)
    try:
        loaded = datasets.load_dataset(str(path), name=config)
    except ValueError as e:
        if "BuilderConfig" not in str(e):  # pyarrow's parse errors are ValueErrors too
            raise _folder_error(path, e) from None
        raise DataError(f"{_first_line(e)} (--data-config picks a configuration).", path=str(path)) from None
    except (OSError, datasets.exceptions.DatasetsError) as e:
        raise _folder_error(path, e) from None
    return _from_dataset(loaded, str(path), "dataset folder", split, prefer, config)


def _hidden(p: Path, root: Path) -> bool:
    return any(part.startswith((".", "_")) for part in p.relative_to(root).parts)


def _folder_error(path: Path, e: Exception) -> DataError:
    """A data file the `datasets` library could not read: find which one, and where, when we can."""
    for f in sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path)):
        if f.name.lower().endswith((".jsonl", ".json", ".jsonl.gz", ".json.gz")):
            try:
                _, errors, _ = scan_records(f)
            except DataError as err:
                return err
            if errors:
                return errors[0][1]
    return DataError(f"the `datasets` library cannot read this folder: {_why(e)}", path=str(path))


def _open_hub(repo: str, split, config, revision, prefer) -> SourceRows:
    datasets = _datasets(repo)
    try:
        loaded = datasets.load_dataset(repo, name=config, revision=revision)
    except ConnectionError as e:
        offline = "OfflineMode" in str(e) or os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        where = os.environ.get("HF_DATASETS_CACHE") or str(datasets.config.HF_DATASETS_CACHE)
        if offline:
            msg = (f"is not a local file or folder, and the Hub dataset `{repo}` is not in the datasets cache "
                   f"({where}) while offline (HF_HUB_OFFLINE=1). Load it once with network access, or give a "
                   "local path.")
        else:
            msg = (f"is not a local file or folder, and the Hugging Face Hub cannot be reached to download the "
                   f"dataset `{repo}` (it is not in the datasets cache {where}). Check the network, or set "
                   "HF_HUB_OFFLINE=1 to use only cached datasets.")
        raise DataError(msg, path=repo) from None
    except datasets.exceptions.DatasetNotFoundError as e:
        raise DataError(f"is not a local file or folder, and as a Hub dataset: {_first_line(e)} (a gated or private "
                        "dataset needs `hf auth login`).", path=repo) from None
    except ValueError as e:  # an unknown --data-config, a config missing from the cache, a bad file
        hint = "; --data-config picks a configuration" if "config" in str(e).lower() else ""
        raise DataError(f"{_why(e)}{hint}.", path=repo) from None
    except (OSError, datasets.exceptions.DatasetsError) as e:
        raise DataError(f"the `datasets` library cannot load this Hub dataset: {_why(e)}", path=repo) from None
    return _from_dataset(loaded, repo, "Hub dataset", split, prefer, config)


def _datasets(what: str):
    try:
        import datasets
    except ImportError:
        raise DataError("reading dataset folders and Hub ids needs the `datasets` library: "
                        "pip install datasets", path=what) from None
    datasets.logging.set_verbosity(datasets.logging.CRITICAL)  # its reasons reach the user in our DataError
    return datasets


def _from_dataset(loaded, label: str, container: str, split, prefer, config=None) -> SourceRows:
    """Rows of a Dataset, or of one split of a DatasetDict (--data-split, else the preferred one)."""
    if hasattr(loaded, "keys"):  # a DatasetDict
        names = list(loaded.keys())
        if split is None:
            split = next((s for s in prefer if s in names), names[0] if len(names) == 1 else None)
            if split is None:
                raise DataError(f"has splits {', '.join(names)}; choose one with --data-split (or "
                                "--eval-data-split for --eval-data).", path=label)
        elif split not in names:
            raise DataError(f"has no split `{split}`; its splits are: {', '.join(names)}.", path=label)
        loaded = loaded[split]
        label = f"{label} ({f'config {config}, ' if config else ''}split {split})"
    elif split is not None and split != "train":
        raise DataError(f"holds one dataset without splits; drop --data-split {split}.", path=label)
    if len(loaded) == 0:
        raise DataError("has no rows.", path=label)
    return SourceRows(label, container, "row", list(enumerate(loaded.to_list())), [])


def _why(e: Exception) -> str:
    """An exception and its cause in one bounded line (datasets wraps the real reason)."""
    parts = [str(x) for x in (e, e.__cause__ or e.__context__) if x is not None and str(x).strip()]
    text = " ".join(" ".join(parts).split())
    return (text[:400] + " ...") if len(text) > 400 else text or type(e).__name__


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return (text[0] if text else type(e).__name__).rstrip(".")


# --------------------------------------------------------------------------- columns

def _renamed(src: SourceRows, mapping: dict[str, str]) -> SourceRows:
    """Rename their columns to ours. A table without a mapped column is one error for the
    source; a JSON record without the key is an error for that record."""
    if src.numbered_by == "row" and src.rows:
        have = set(src.rows[0][1])
        missing = [f"{ours}={theirs}" for ours, theirs in mapping.items() if theirs not in have]
        if missing:
            raise DataError(f"--data-columns {', '.join(missing)}: no such column; the columns are "
                            f"{', '.join(sorted(have))}.", path=src.label)
    rows, errors = [], list(src.errors)
    for n, record in src.rows:
        lost = [f"{ours}={theirs}" for ours, theirs in mapping.items() if theirs not in record]
        if lost:
            errors.append((n, DataError(f"has no key for --data-columns {', '.join(lost)}; the record has keys "
                                        f"{sorted(record)}.", **src.where(n), field=lost[0].split('=')[1])))
            continue
        taken = {theirs: record[theirs] for theirs in mapping.values()}
        out = {k: v for k, v in record.items() if k not in taken and k not in mapping}
        out.update({ours: taken[theirs] for ours, theirs in mapping.items()})
        rows.append((n, out))
    errors.sort(key=lambda item: item[0])
    return SourceRows(src.label, src.container, src.numbered_by, rows, errors)


# --------------------------------------------------------------------------- identity

def source_digest(spec, **options) -> str:
    """A content hash of a local file (its bytes) or folder (every file, by relative path); a Hub
    id hashes as its name, revision, config and split. For cache keys (the rows' tokens are hashed too)."""
    path = Path(spec)
    h = hashlib.sha256()
    if path.is_file():
        files = [path]
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not _hidden(p, path))
        for f in files:
            h.update(str(f.relative_to(path)).encode() + b"\0")
    else:
        keys = sorted((k, options.get(k)) for k in ("revision", "config", "split"))
        return "hub:" + hashlib.sha256(repr((str(spec), keys)).encode()).hexdigest()
    for f in files:
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
