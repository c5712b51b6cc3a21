"""The record kinds preftune trains on, and the checks every record passes first.

pairwise  `prompt`, `chosen`, `rejected` — text or message lists (TRL, UltraFeedback); without
          `prompt`, the prompt is the shared prefix of chosen and rejected (HH-RLHF). Optional:
          `label` soft preference p ∈ [0, 1] (smooth_dpo), `margins` [[chosen M], [rejected M]]
          (MODPO), `score_chosen` / `score_rejected`.
unpaired  `prompt`, `completion`, `label` (true = desirable) — KTO-style data.
ranked    `prompt`, `responses` (≥ 2), `scores` (one finite number per response).

`validate` turns raw dicts into `Record`s and lists every problem with its row and field; it never
stops at the first one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from preftune.data.sources import Problem, SourceData
from preftune.types import Kind

KINDS: tuple[str, ...] = ("pairwise", "unpaired", "ranked")
ROLES = ("system", "user", "assistant", "tool")
ALL_FIELDS = (
    "prompt",
    "chosen",
    "rejected",
    "completion",
    "label",
    "responses",
    "scores",
    "margins",
    "score_chosen",
    "score_rejected",
)

Message = dict[str, str]
Content = str | list[Message]


@dataclass
class Record:
    """One validated record. Responses are best first (pairwise: [chosen, rejected]).

    prompt/responses are text, or message lists when `conversational` (text parts are then wrapped
    as a user prompt / an assistant reply).
    """

    row: int
    kind: Kind
    prompt: Content
    responses: list[Content]
    conversational: bool
    label: float | None = None
    scores: list[float] | None = None
    margins: list[list[float]] | None = None


def detect_kind(record: dict[str, Any]) -> Kind | None:
    """Guess the kind from the fields present: responses → ranked, completion → unpaired,
    chosen/rejected → pairwise."""
    if "responses" in record:
        return "ranked"
    if "completion" in record:
        return "unpaired"
    if "chosen" in record or "rejected" in record:
        return "pairwise"
    return None


def apply_columns(record: dict[str, Any], columns: dict[str, str]) -> dict[str, Any]:
    """Rename the user's columns to preftune's field names (columns maps field → column)."""
    if not columns:
        return record
    out = dict(record)
    for name, col in columns.items():
        if name != col:
            out.pop(name, None)
            if col in record:
                out[name] = record[col]
    return out


class _Checker:
    """Collects the problems of one row; `name` shows the user's column name when it was mapped."""

    def __init__(self, path: str, row: int, columns: dict[str, str]) -> None:
        self.path, self.row, self.columns = path, row, columns
        self.problems: list[Problem] = []

    def name(self, field: str) -> str:
        head, sep, rest = field.partition("[")
        col = self.columns.get(head)
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


def _wrap(content: Content, role: str) -> list[Message]:
    return content if isinstance(content, list) else [{"role": role, "content": content}]


def _reply(c: _Checker, field: str, prompt: list[Message], reply: list[Message]) -> list[Message] | None:
    """The reply turns of a response. A response that repeats the prompt's turns first (as in
    UltraFeedback, whose chosen/rejected hold the whole conversation next to a text prompt) has them
    removed; a response that still opens with a non-assistant turn is an error."""
    n = len(prompt)
    if reply[:n] == prompt and len(reply) > n:
        reply = reply[n:]
    elif (
        reply[0]["role"] == "user"
        and prompt[-1]["role"] == "user"
        and reply[0]["content"] == prompt[-1]["content"]
    ):
        reply = reply[1:] if len(reply) > 1 else reply  # the prompt's last user turn, without the system turn
    if reply[0]["role"] not in ("assistant",):
        c.add(
            f"{field}[0].role",
            f"response opens with a {reply[0]['role']!r} turn that is not in the prompt",
            "put every turn before the reply into 'prompt' (or leave 'prompt' out to use the shared prefix "
            "of chosen and rejected)",
            reason=f"{field.split('[')[0]}: opens with a non-assistant turn",
        )
        return None
    return reply


def _text_split(chosen: str, rejected: str) -> int:
    """Where the implicit text prompt ends: the common prefix, backed off to a word start, with
    trailing whitespace left to the responses (BPE tokenizers attach the space to the next word)."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    if n < min(len(chosen), len(rejected)) and n > 0 and not chosen[n - 1].isspace():
        while n > 0 and not chosen[n - 1].isspace():
            n -= 1
    while n > 0 and chosen[n - 1].isspace():
        n -= 1
    return n


def _message_split(chosen: list[Message], rejected: list[Message]) -> int:
    """Where the implicit message prompt ends: the longest shared prefix of messages after which
    both conversations continue with an assistant turn."""
    n = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        n += 1
    while n > 0 and not (
        n < len(chosen)
        and n < len(rejected)
        and chosen[n]["role"] == "assistant"
        and rejected[n]["role"] == "assistant"
    ):
        n -= 1
    return n


def _pairwise(c: _Checker, r: dict[str, Any]) -> Record | None:
    for f in ("chosen", "rejected"):
        if r.get(f) is None:
            c.missing(f, "pairwise")
    has_prompt = r.get("prompt") is not None
    prompt = c.content("prompt", r["prompt"], response=False) if has_prompt else None
    chosen = c.content("chosen", r["chosen"], response=True) if r.get("chosen") is not None else None
    rejected = c.content("rejected", r["rejected"], response=True) if r.get("rejected") is not None else None
    label = r.get("label")
    if label is not None and (not _is_number(label) or not 0.0 <= label <= 1.0):
        c.add(
            "label",
            f"{label!r} is not a probability in [0, 1]",
            "a pairwise label is the soft preference p that chosen is better; write e.g. 0.8 or drop it",
            reason="label: not in [0, 1]",
        )
    margins = None
    if r.get("margins") is not None:
        m = r["margins"]
        if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, list) for x in m)):
            c.add(
                "margins",
                f"is {_type(m)}, expected [[chosen margins], [rejected margins]]",
                "write one list of M margin rewards per response, e.g. [[0.5, 1.0], [0.1, 0.2]]",
                reason="margins: wrong shape",
            )
        else:
            mc = c.numbers("margins[0]", m[0], None, "")
            mr = c.numbers(
                "margins[1]", m[1], len(m[0]), "give chosen and rejected the same number of margins"
            )
            margins = [mc, mr] if mc is not None and mr is not None else None
    scores = None
    if r.get("score_chosen") is not None or r.get("score_rejected") is not None:
        scores = c.numbers("score_chosen", [r.get("score_chosen"), r.get("score_rejected")], None, "")
    if c.problems or chosen is None or rejected is None:
        return None
    conv = any(isinstance(x, list) for x in (prompt, chosen, rejected))
    if not has_prompt:
        if conv:
            ch, rj = _wrap(chosen, "assistant"), _wrap(rejected, "assistant")
            n = _message_split(ch, rj)
            prompt, chosen, rejected = ch[:n], ch[n:], rj[n:]
        else:
            assert isinstance(chosen, str) and isinstance(rejected, str)
            n = _text_split(chosen, rejected)
            prompt, chosen, rejected = chosen[:n], chosen[n:], rejected[n:]
        if n == 0:
            c.add(
                "prompt",
                "no 'prompt' and chosen/rejected share no prefix to use as the prompt",
                "add a 'prompt' field, or give chosen and rejected the full conversation (same prompt "
                "turns, then different assistant replies)",
                reason="prompt: no common prefix",
            )
            return None
        if (isinstance(chosen, str) and not chosen.strip()) or (
            isinstance(rejected, str) and not rejected.strip()
        ):
            c.add(
                "chosen",
                "empty text after removing the shared prompt prefix",
                "give chosen and rejected different replies after the shared prompt",
                reason="chosen: empty text",
            )
            return None
    assert prompt is not None
    if conv:
        prompt = _wrap(prompt, "user")
        chosen = _reply(c, "chosen", prompt, _wrap(chosen, "assistant"))
        rejected = _reply(c, "rejected", prompt, _wrap(rejected, "assistant"))
        if chosen is None or rejected is None:
            return None
    if chosen == rejected:
        c.add(
            "rejected",
            "identical to chosen",
            "a pair needs two different responses; fix or drop the row",
            reason="chosen identical to rejected",
        )
        return None
    return Record(
        c.row,
        "pairwise",
        prompt,
        [chosen, rejected],
        conv,
        label=float(label) if label is not None else None,
        scores=scores,
        margins=margins,
    )


def _unpaired(c: _Checker, r: dict[str, Any]) -> Record | None:
    for f in ("prompt", "completion", "label"):
        if r.get(f) is None:
            c.missing(f, "unpaired")
    prompt = c.content("prompt", r["prompt"], response=False) if r.get("prompt") is not None else None
    completion = (
        c.content("completion", r["completion"], response=True) if r.get("completion") is not None else None
    )
    label = r.get("label")
    if label is not None and not isinstance(label, bool):
        c.add(
            "label",
            f"{label!r} is not a boolean",
            "write true (desirable) or false (undesirable), without quotes",
            reason="label: not a boolean",
        )
    if c.problems or prompt is None or completion is None:
        return None
    conv = isinstance(prompt, list) or isinstance(completion, list)
    if conv:
        prompt = _wrap(prompt, "user")
        completion = _reply(c, "completion", prompt, _wrap(completion, "assistant"))
        if completion is None:
            return None
    return Record(c.row, "unpaired", prompt, [completion], conv, label=1.0 if label else 0.0)


def _ranked(c: _Checker, r: dict[str, Any]) -> Record | None:
    for f in ("prompt", "responses", "scores"):
        if r.get(f) is None:
            c.missing(f, "ranked")
    prompt = c.content("prompt", r["prompt"], response=False) if r.get("prompt") is not None else None
    responses: list[Content | None] = []
    value = r.get("responses")
    if value is not None:
        if not isinstance(value, list):
            c.add(
                "responses",
                f"is {_type(value)}, expected a list of responses",
                'write ["first reply", "second reply", ...]',
                reason="responses: wrong type",
            )
        elif len(value) < 2:
            c.add(
                "responses",
                f"has {len(value)} response(s); ranking needs at least 2",
                "add responses or drop the row",
                reason="responses: fewer than 2",
            )
        else:
            responses = [c.content(f"responses[{i}]", v, response=True) for i, v in enumerate(value)]
    scores = None
    if r.get("scores") is not None:
        n = len(value) if isinstance(value, list) else None
        scores = c.numbers("scores", r["scores"], n, "give exactly one score per response")
    if c.problems or prompt is None or scores is None or not responses:
        return None
    conv = isinstance(prompt, list) or any(isinstance(x, list) for x in responses)
    resp = [x for x in responses if x is not None]
    if conv:
        prompt = _wrap(prompt, "user")
        replies = [_reply(c, f"responses[{i}]", prompt, _wrap(x, "assistant")) for i, x in enumerate(resp)]
        if any(r is None for r in replies):
            return None
        resp = [r for r in replies if r is not None]
    order = sorted(range(len(resp)), key=lambda i: -scores[i])  # stable: ties keep file order
    return Record(c.row, "ranked", prompt, [resp[i] for i in order], conv, scores=[scores[i] for i in order])


_VALIDATORS = {"pairwise": _pairwise, "unpaired": _unpaired, "ranked": _ranked}


def validate(
    data: SourceData, *, kind: str | None = None, columns: dict[str, str] | None = None
) -> tuple[list[Record], list[Problem], Kind | None]:
    """Check every record of `data` as `kind` (detected from the first record when None).

    Returns the valid records, every problem (read problems included, in row order) and the kind.
    """
    columns = columns or {}
    problems = list(data.problems)
    if kind is not None and kind not in KINDS:
        from preftune.errors import ConfigError

        raise ConfigError(f"unknown kind '{kind}' — use one of {', '.join(KINDS)}")
    records: list[Record] = []
    first = next((r for _, r in data.rows if r is not None), None)
    if kind is None and first is not None:
        kind = detect_kind(apply_columns(first, columns))
        if kind is None:
            problems.append(
                Problem(
                    f"cannot tell the record kind from the fields {sorted(first)}",
                    path=data.path,
                    fix="pass --kind pairwise|unpaired|ranked, or map your columns, e.g. "
                    "--columns chosen=response_a,rejected=response_b",
                )
            )
    if kind is None:
        return records, _sorted(problems), None
    check = _VALIDATORS[kind]
    for row, raw in data.rows:
        if raw is None:
            continue
        c = _Checker(data.path, row, columns)
        rec = check(c, apply_columns(raw, columns))
        problems.extend(c.problems)
        if rec is not None:
            records.append(rec)
    return records, _sorted(problems), kind  # type: ignore[return-value]


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: -1 if p.row is None else p.row)
