"""Errors meant for people. The CLI prints their message (no traceback) and exits non-zero."""
from __future__ import annotations

from typing import Optional


class PrefalignError(Exception):
    """A problem the user can fix: say which file, record and field, and what to do."""

    exit_code = 2
    label = "error"  # the word the CLI prints before the message


class ConfigError(PrefalignError):
    """A bad option, YAML key or value."""


class DataError(PrefalignError):
    """Bad input data: names the file, the line or record, and the field."""

    def __init__(self, message: str, path: str | None = None, line: int | None = None, field: str | None = None):
        where = ""
        if path is not None:
            where = str(path)
            if line is not None:
                where += f", line {line}"
            if field is not None:
                where += f", field `{field}`"
            where += ": "
        super().__init__(where + message)
        self.path, self.line, self.field = path, line, field


class ModelError(PrefalignError):
    """A model path that is not a model, a missing tokenizer, mismatched vocabularies."""


class DiskError(PrefalignError):
    """A write that failed under a run: a full disk, an exceeded quota or file-size limit, an output
    folder that became read-only or disappeared, an I/O error (train/diskio.py builds the message:
    which file, the space it needed and the space free, what to do). The files written before are
    intact, so this is a stop, not a usage error: exit 3, and --resume continues once it is fixed."""

    exit_code = 3
    label = "stopped"

    def __init__(self, message: str, path: Optional[str] = None, errno: Optional[int] = None):
        super().__init__(message)
        self.path, self.errno = path, errno

    def __reduce__(self):  # sent from rank 0 to the other ranks, so that every rank stops alike
        return type(self), (str(self), self.path, self.errno)


class InternalError(PrefalignError):
    """A bug in prefalign, not in the user's input (e.g. processes that should hold identical
    weights do not): the message says what broke and asks for a report."""

    exit_code = 70  # EX_SOFTWARE (sysexits.h): an internal software error, not a usage error
    label = "internal error"
