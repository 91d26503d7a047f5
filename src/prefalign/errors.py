"""Errors meant for people. The CLI prints their message (no traceback) and exits non-zero."""


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


class InternalError(PrefalignError):
    """A bug in prefalign, not in the user's input (e.g. processes that should hold identical
    weights do not): the message says what broke and asks for a report."""

    exit_code = 70  # EX_SOFTWARE (sysexits.h): an internal software error, not a usage error
    label = "internal error"
