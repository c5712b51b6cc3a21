"""The record kinds preftune trains on, and the checks every record passes first.

pairwise  `prompt`, `chosen`, `rejected` — text or message lists (TRL, UltraFeedback); without
          `prompt`, the prompt is the shared prefix of chosen and rejected (HH-RLHF). Optional:
          `label` soft preference p ∈ [0, 1] (smooth_dpo), `margins` [[chosen M], [rejected M]]
          (MODPO), `score_chosen` / `score_rejected`, `margin` (a reward model's bt_margin / bt_scaled m).
unpaired  `prompt`, `completion`, `label` (true = desirable) — KTO-style data.
ranked    `prompt`, `responses` (≥ 2), `scores` (one finite number per response).

`validate` turns raw dicts into `Record`s and lists every problem with its row and field; it never
stops at the first one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from preftune.data.checks import ROLES as ROLES
from preftune.data.checks import Checker, Content, Message, _is_number, _type
from preftune.data.layouts import ALL_FIELDS as ALL_FIELDS
from preftune.data.layouts import apply_columns, detect_kind, normalize
from preftune.data.rows import Problem, SourceData
from preftune.types import Kind

KINDS: tuple[str, ...] = ("pairwise", "unpaired", "ranked")


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
    margin: float | None = None


def _wrap(content: Content, role: str) -> list[Message]:
    return content if isinstance(content, list) else [{"role": role, "content": content}]


def _reply(c: Checker, field: str, prompt: list[Message], reply: list[Message]) -> list[Message] | None:
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


def _pair_label(c: Checker, r: dict[str, Any]) -> Any:
    """The optional soft preference `label` p ∈ [0, 1] of a pair (as written)."""
    label = r.get("label")
    if label is not None and (not _is_number(label) or not 0.0 <= label <= 1.0):
        c.add(
            "label",
            f"{label!r} is not a probability in [0, 1]",
            "a pairwise label is the soft preference p that chosen is better; write e.g. 0.8 or drop it",
            reason="label: not in [0, 1]",
        )
    return label


def _pair_margins(c: Checker, r: dict[str, Any]) -> list[list[float]] | None:
    """The optional `margins` [[chosen M], [rejected M]] of a pair (MODPO)."""
    if r.get("margins") is None:
        return None
    m = r["margins"]
    if not (isinstance(m, list) and len(m) == 2 and all(isinstance(x, list) for x in m)):
        c.add(
            "margins",
            f"is {_type(m)}, expected [[chosen margins], [rejected margins]]",
            "write one list of M margin rewards per response, e.g. [[0.5, 1.0], [0.1, 0.2]]",
            reason="margins: wrong shape",
        )
        return None
    mc = c.numbers("margins[0]", m[0], None, "")
    mr = c.numbers("margins[1]", m[1], len(m[0]), "give chosen and rejected the same number of margins")
    return [mc, mr] if mc is not None and mr is not None else None


def _pair_margin(c: Checker, r: dict[str, Any]) -> float | None:
    """The optional `margin` of a pair: a finite number (bt_margin's m, bt_scaled's strength)."""
    m = r.get("margin")
    if m is None:
        return None
    if not _is_number(m) or not math.isfinite(m):
        c.add(
            "margin",
            f"is {_type(m) if not _is_number(m) else m}, expected a finite number",
            "write how much chosen is better as a number, e.g. 1, 2 or 3, or drop the field",
            reason="margin: not a finite number",
        )
        return None
    return float(m)


def _pair_scores(c: Checker, r: dict[str, Any]) -> list[float] | None:
    """The optional `score_chosen` / `score_rejected` of a pair: both finite numbers, or neither."""
    if r.get("score_chosen") is None and r.get("score_rejected") is None:
        return None
    for f in ("score_chosen", "score_rejected"):
        v: Any = r.get(f)
        if not _is_number(v) or not math.isfinite(v):
            c.add(
                f,
                f"is {_type(v) if not _is_number(v) else v}, expected a finite number",
                "give both score_chosen and score_rejected as numbers, or neither",
                reason=f"{f}: not a finite number",
            )
    if c.problems:
        return None
    return [float(r["score_chosen"]), float(r["score_rejected"])]


def _shared_prompt(
    c: Checker, chosen: Content, rejected: Content, conv: bool
) -> tuple[Content, Content, Content] | None:
    """(prompt, chosen, rejected) of a pair written without a prompt (HH-RLHF): the prompt is the
    prefix chosen and rejected share; None (with the problem added) when there is none to use."""
    prompt: Content
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
    return prompt, chosen, rejected


def _pairwise(c: Checker, r: dict[str, Any]) -> Record | None:
    for f in ("chosen", "rejected"):
        if r.get(f) is None:
            c.missing(f, "pairwise")
    has_prompt = r.get("prompt") is not None
    prompt = c.content("prompt", r["prompt"], response=False) if has_prompt else None
    chosen = c.content("chosen", r["chosen"], response=True) if r.get("chosen") is not None else None
    rejected = c.content("rejected", r["rejected"], response=True) if r.get("rejected") is not None else None
    label = _pair_label(c, r)
    margins = _pair_margins(c, r)
    margin = _pair_margin(c, r)
    scores = _pair_scores(c, r)
    if c.problems or chosen is None or rejected is None:
        return None
    conv = any(isinstance(x, list) for x in (prompt, chosen, rejected))
    if not has_prompt:
        split = _shared_prompt(c, chosen, rejected, conv)
        if split is None:
            return None
        prompt, chosen, rejected = split
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
        margin=margin,
    )


def _unpaired(c: Checker, r: dict[str, Any]) -> Record | None:
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


def _ranked(c: Checker, r: dict[str, Any]) -> Record | None:
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
        if any(x is None for x in replies):
            return None
        resp = [x for x in replies if x is not None]
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
    missing = missing_columns(data, columns)
    if missing:
        problems.append(missing)
        return records, _sorted(problems), None
    first = next((r for _, r in data.rows if r is not None), None)
    if kind is None and first is not None:
        kind = detect_kind(normalize(apply_columns(first, columns))[0])
        if kind is None:  # a process reward model's step labels are named as such
            problems.append(
                _step_data(first, data.path)
                or Problem(
                    f"cannot tell the record kind from the fields {sorted(first)}",
                    path=data.path,
                    fix=(
                        "rows with a 'prompt' and no response are prompts: give them as --prompts (an online "
                        "method's; preftune eval RUN --prompts FILE --reward NAME), or "
                        if "prompt" in first
                        else ""
                    )
                    + "pass --kind pairwise|unpaired|ranked, or map your columns, e.g. "
                    "--columns chosen=response_a,rejected=response_b",
                )
            )
    if kind is None:
        return records, _sorted(problems), None
    check = _VALIDATORS[kind]
    for row, raw in data.rows:
        if raw is None:
            continue
        record, names, _ = normalize(apply_columns(raw, columns))
        c = Checker(data.path, row, columns, names)
        rec = check(c, record)
        _misspelled_fields(c, record, kind)
        problems.extend(c.problems)
        if rec is not None and not c.problems:
            records.append(rec)
    return records, _sorted(problems), kind  # type: ignore[return-value]


# The fields each kind reads: a column one or two letters off one of them, which the row lacks, is
# a typo (`promt`): without it a pair would silently train on the shared prefix as its prompt.
KIND_FIELDS: dict[str, tuple[str, ...]] = {
    "pairwise": (
        "prompt",
        "chosen",
        "rejected",
        "label",
        "margins",
        "margin",
        "score_chosen",
        "score_rejected",
    ),
    "unpaired": ("prompt", "completion", "label"),
    "ranked": ("prompt", "responses", "scores"),
}


def _misspelled_fields(c: Checker, record: dict[str, Any], kind: str) -> None:
    """A problem for each column of `record` that looks like a misspelled field of `kind` it lacks."""
    absent = [f for f in KIND_FIELDS[kind] if f not in record]
    for key in record:
        if key in ALL_FIELDS or key in c.columns.values():
            continue
        name = str(key).lower()  # `Prompt`, `promt`, `lable`, `rejeted` — not `prompt_id`, `chosen_rating`
        close = [f for f in absent if _edits(name, f) <= (2 if len(f) >= 8 else 1)]
        if close:
            c.add(
                str(key),
                f"unknown column — did you mean '{close[0]}'? (this row has no '{close[0]}')",
                f"rename the column to '{close[0]}', or map it: --columns {close[0]}={key}",
            )


def _edits(a: str, b: str) -> int:
    """Edits (insert, delete, substitute, swap two neighbours) that turn `a` into `b`."""
    d = [[i + j if i * j == 0 else 0 for j in range(len(b) + 1)] for i in range(len(a) + 1)]
    for i in range(1, len(a) + 1):
        for j in range(1, len(b) + 1):
            d[i][j] = min(d[i - 1][j] + 1, d[i][j - 1] + 1, d[i - 1][j - 1] + (a[i - 1] != b[j - 1]))
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                d[i][j] = min(d[i][j], d[i - 2][j - 2] + 1)
    return d[len(a)][len(b)]


def _step_data(record: dict[str, Any], path: str = "") -> Problem | None:
    """The problem of a process reward model's step labels read as preference data (`preftune train rm`,
    `preftune eval`), or None when `record` is no step-labelled row (`data check`'s own recognition)."""
    from preftune.reward.data_check import looks_like_steps

    if not looks_like_steps(record):
        return None
    return Problem(
        f"looks like step-labelled data (prompt, steps, labels; fields {sorted(record)}), not preference data",
        path=path,
        fix="train a process reward model on it with 'preftune train prm' ('preftune eval' of a prm run "
        f"reads it too), or check it with 'preftune data check {path or 'FILE'}'",
    )


def missing_columns(data: SourceData, columns: dict[str, str]) -> Problem | None:
    """A problem naming each --columns column that no record of `data` has, or None."""
    rows = [r for _, r in data.rows if r is not None]
    if not rows:
        return None
    gone = [(f, col) for f, col in columns.items() if not any(col in r for r in rows)]
    if not gone:
        return None
    what = ", ".join(f"{f}={col}" for f, col in gone)
    return Problem(
        f"--columns {what}: the data has no column {', '.join(repr(c) for _, c in gone)} "
        f"(its columns: {', '.join(sorted(rows[0]))})",
        path=data.path,
        fix="name a column the data has, e.g. --columns chosen=response_a",
    )


def _sorted(problems: list[Problem]) -> list[Problem]:
    return sorted(problems, key=lambda p: -1 if p.row is None else p.row)
