"""Errors meant for people: each names what is wrong, where, and how to fix it."""

from __future__ import annotations


class PreftuneError(Exception):
    """Base class of every error preftune raises on purpose (bad input, bad config, failed run)."""


class ConfigError(PreftuneError):
    """A configuration value is unknown, out of range or inconsistent."""


class DataError(PreftuneError):
    """A data file or record is unusable. The message names PATH:ROW, the field and the fix."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        row: int | None = None,
        field: str | None = None,
        fix: str | None = None,
    ) -> None:
        self.path, self.row, self.field, self.fix = path, row, field, fix
        self.problem = message
        super().__init__(format_problem(message, path=path, row=row, field=field, fix=fix))


class TrainingError(PreftuneError):
    """A run cannot go on (for example a non-finite loss); the message names the step and checkpoint."""


def format_problem(
    message: str,
    *,
    path: str | None = None,
    row: int | None = None,
    field: str | None = None,
    fix: str | None = None,
) -> str:
    """Render `PATH:ROW: field 'NAME': what is wrong — how to fix`, leaving out the parts not known."""
    where = ""
    if path is not None:
        where = f"{path}:{row}: " if row is not None else f"{path}: "
    elif row is not None:
        where = f"row {row}: "
    what = f"field '{field}': {message}" if field else message
    return f"{where}{what}" + (f" — {fix}" if fix else "")
