"""What every reader returns: the records of one source with their rows, and the problems met.

The lowest layer of the data package (readers → records → validation → formatting → tokens): it
imports nothing else from `preftune.data`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.errors import format_problem


@dataclass
class Problem:
    """One thing wrong with the data, rendered as `PATH:ROW: field 'NAME': what — fix`."""

    message: str
    row: int | None = None
    field: str | None = None
    fix: str | None = None
    path: str | None = None
    reason: str | None = None  # short category used to count dropped rows, e.g. "chosen: empty text"

    def render(self) -> str:
        return format_problem(self.message, path=self.path, row=self.row, field=self.field, fix=self.fix)

    @property
    def category(self) -> str:
        if self.reason:
            return self.reason
        return f"{self.field}: {self.message}" if self.field else self.message


@dataclass
class SourceData:
    """Records read from one source.

    path:     how the source is named in messages (file path, folder or hub id).
    rows:     (row, record) in source order; record is None where the row could not be read.
    problems: read problems; those with `row=None` concern the whole source.
    """

    path: str
    rows: list[tuple[int, dict[str, Any] | None]] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def _empty(path: str) -> Problem:
    return Problem("file is empty", path=path, fix="write at least one record")


def _bad_utf8(path: str, row: int, err: UnicodeDecodeError, offset: int = 0) -> Problem:
    byte = err.object[err.start : err.start + 1].hex()
    return Problem(
        f"bytes are not valid UTF-8 (0x{byte} at byte {offset + err.start + 1})",
        row=row,
        path=path,
        reason="not valid UTF-8",
        fix="re-save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)",
    )


def _not_object(path: str, row: int, value: Any, what: str = "line") -> Problem:
    return Problem(
        f"{what} is a JSON {type(value).__name__}, not an object",
        row=row,
        path=path,
        reason=f"{what} is not an object",
        fix='write one object per record, e.g. {"prompt": "...", "chosen": "...", "rejected": "..."}',
    )


def read_text(path: Path) -> str | SourceData:
    """The whole file decoded as UTF-8 (a BOM allowed), or a `SourceData` holding the problem:
    an empty file, or non-UTF-8 bytes reported at their 1-based line."""
    label = str(path)
    raw = path.read_bytes()
    if not raw.strip():
        return SourceData(label, problems=[_empty(label)])
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = raw[: err.start].count(b"\n") + 1
        return SourceData(label, problems=[_bad_utf8(label, line, err)])


def _from_dicts(label: str, values: list[Any], *, start_row: int, what: str = "record") -> SourceData:
    data = SourceData(label)
    for i, value in enumerate(values, start=start_row):
        if isinstance(value, dict):
            data.rows.append((i, value))
        else:
            data.problems.append(_not_object(label, i, value, what))
            data.rows.append((i, None))
    return data


def render_problems(problems: list[Problem], cap: int = 20) -> str:
    """The first `cap` problems, one per line, then 'and N more problems'."""
    lines = [p.render() for p in problems[:cap]]
    if len(problems) > cap:
        lines.append(f"... and {len(problems) - cap} more problems ({len(problems)} in total)")
    return "\n".join(lines)
