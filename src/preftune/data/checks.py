"""Field checks shared by the record kinds: each problem is collected with its row, field and fix.

`Checker` gathers the problems of one row; `name` shows the user's own column name where
`--columns` mapped it, so messages point at the file as the user sees it.
"""

from __future__ import annotations

import math
from typing import Any

from preftune.data.rows import Problem

ROLES = ("system", "user", "assistant", "tool")

Message = dict[str, Any]
Content = str | list[Message]


class Checker:
    """Collects the problems of one row; `name` shows the user's column name when it was mapped."""

    def __init__(
        self, path: str, row: int, columns: dict[str, str], names: dict[str, str] | None = None
    ) -> None:
        """columns: the user's --columns mapping; names: the column behind each field that a
        layout conversion filled (e.g. prompt ← conversations), used only to name fields."""
        self.path, self.row, self.columns = path, row, columns
        self.names = {**(names or {}), **columns}
        self.problems: list[Problem] = []

    def name(self, field: str) -> str:
        head, sep, rest = field.partition("[")
        col = self.names.get(head)
        return f"{col}{sep}{rest}" if col and col != head else field

    def add(self, field: str, message: str, fix: str, reason: str | None = None) -> None:
        top = field.split("[", 1)[0].split(".", 1)[0]
        self.problems.append(
            Problem(
                message,
                row=self.row,
                field=self.name(field),
                fix=fix,
                path=self.path,
                reason=reason or f"{top}: {message}",
            )
        )

    def missing(self, field: str, kind: str) -> None:
        mapped = f" (mapped from column '{self.columns[field]}')" if field in self.columns else ""
        self.add(
            field,
            f"missing{mapped}",
            f"add '{field}' to every {kind} record, or map your column with --columns {field}=YOUR_COLUMN",
            reason=f"{field}: missing",
        )

    def messages(self, field: str, value: list[Any], *, response: bool) -> list[Message] | None:
        if not value:
            self.add(
                field,
                "is an empty list",
                "give at least one message, or plain text",
                reason=f"{field.split('[')[0]}: empty text",
            )
            return None
        ok = True
        for i, m in enumerate(value):
            where = f"{field}[{i}]"
            if not isinstance(m, dict):
                self.add(
                    where,
                    f"is a {type(m).__name__}, not a message object",
                    'write {"role": "user", "content": "..."}',
                    reason=f"{field}: wrong type",
                )
                ok = False
                continue
            role = m.get("role")
            if role is None:
                self.add(
                    f"{where}.role",
                    "missing role",
                    f"give each message a role: {', '.join(ROLES)}",
                    reason="message: missing role",
                )
                ok = False
            elif role not in ROLES:
                self.add(
                    f"{where}.role",
                    f"unknown role {role!r}",
                    f"use one of {', '.join(ROLES)}",
                    reason="message: unknown role",
                )
                ok = False
            if not isinstance(m.get("content"), str):
                got = "missing" if "content" not in m else f"a {type(m.get('content')).__name__}"
                self.add(
                    f"{where}.content",
                    f"content is {got}, not a string",
                    "give each message its text as a string in 'content'",
                    reason="message: content not a string",
                )
                ok = False
        if not ok:
            return None
        # Keep every key a template may read (name, tool_calls...), minus the nulls that Parquet's
        # merged schemas add to messages that never had them.
        msgs = [{k: v for k, v in m.items() if v is not None} for m in value]
        last = msgs[-1]
        if response and last["role"] != "assistant":
            self.add(
                f"{field}[{len(msgs) - 1}].role",
                f"last message is from {last['role']!r}, not 'assistant'",
                "end each response with the assistant's reply",
                reason=f"{field}: last message not assistant",
            )
            return None
        if response and not last["content"].strip():
            self.add(
                f"{field}[{len(msgs) - 1}].content",
                "empty text",
                "give the reply some text",
                reason=f"{field}: empty text",
            )
            return None
        if not response and last["role"] == "assistant":
            self.add(
                f"{field}[{len(msgs) - 1}].role",
                "prompt ends with an 'assistant' message",
                "end the prompt with a user (or tool) message; the reply belongs in the response",
            )
            return None
        return msgs

    def content(self, field: str, value: Any, *, response: bool) -> Content | None:
        if isinstance(value, str):
            if not value.strip():
                fix = (
                    "give the response some text"
                    if response
                    else "give the prompt some text, or (pairwise) leave out 'prompt' to use the shared "
                    "prefix of chosen and rejected"
                )
                self.add(field, "empty text", fix, reason=f"{field.split('[')[0]}: empty text")
                return None
            return value
        if isinstance(value, list):
            return self.messages(field, value, response=response)
        self.add(
            field,
            f"is {_type(value)}, expected text or a list of messages",
            'write a string, or [{"role": "user", "content": "..."}, ...]',
            reason=f"{field.split('[')[0]}: wrong type",
        )
        return None

    def numbers(self, field: str, value: Any, length: int | None, fix_len: str) -> list[float] | None:
        if not isinstance(value, list) or not all(_is_number(v) for v in value):
            self.add(
                field,
                f"is {_type(value)}, expected a list of numbers",
                "write e.g. [7.5, 3.0]",
                reason=f"{field}: wrong type",
            )
            return None
        if length is not None and len(value) != length:
            self.add(
                field,
                f"has {len(value)} values for {length} responses",
                fix_len,
                reason=f"{field}: wrong length",
            )
            return None
        bad = [i for i, v in enumerate(value) if not math.isfinite(v)]
        if bad:
            self.add(
                f"{field}[{bad[0]}]",
                f"is {value[bad[0]]}, not a finite number",
                "replace NaN/inf scores with real numbers or drop the row",
                reason=f"{field}: not finite",
            )
            return None
        return [float(v) for v in value]


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _type(v: Any) -> str:
    if v is None:
        return "null"
    name = type(v).__name__
    return f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
