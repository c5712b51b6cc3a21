"""Prompt data of an online run: rows with `prompt` (text or a message list) and extra columns.

Read with the same readers as preference data (JSONL / JSON / Parquet / CSV, dataset folders, hub
ids); every problem is reported as `PATH:ROW: field 'prompt': what — fix`. Message lists go through
the tokenizer's chat template with the generation prompt; text gets the tokenizer's BOS, as the
offline data does. The other columns of a row reach the reward function as keyword arguments.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from preftune.data.formatting import _bos_prefix, read_template
from preftune.data.rows import Problem, render_problems
from preftune.data.sources import read_source
from preftune.errors import DataError

_FIX = "give each row a 'prompt': text, or a list of {role, content} messages"


@dataclass
class PromptRow:
    """One prompt: its token ids, the text the reward sees, its extra columns and its source row."""

    ids: list[int]
    text: str
    columns: dict[str, Any]
    row: int


def _problem(rec: dict[str, Any], row: int, path: str) -> Problem | None:
    prompt = rec.get("prompt")
    if prompt is None:
        return Problem("missing", row=row, field="prompt", fix=_FIX, path=path)
    if isinstance(prompt, str):
        return None if prompt.strip() else Problem("empty text", row=row, field="prompt", fix=_FIX, path=path)
    if (
        isinstance(prompt, list)
        and prompt
        and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
            for m in prompt
        )
    ):
        return None
    name = type(prompt).__name__
    what = "an empty list" if prompt == [] else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"
    return Problem(f"is {what}, not text or a message list", row=row, field="prompt", fix=_FIX, path=path)


def checked_prompt_rows(
    source: str,
    problem: Callable[[dict[str, Any], int, str], Problem | None],
    fix: str,
    *,
    split: str | None = None,
) -> tuple[str, list[tuple[int, dict[str, Any]]]]:
    """The source's path and the (row, record) pairs that `problem` accepts; DataError listing every
    bad row (`PATH:ROW: field`) and "no prompts" (with `fix`) for a source without any."""
    data = read_source(source, split=split)
    problems = list(data.problems)
    good: list[tuple[int, dict[str, Any]]] = []
    for row, rec in data.rows:
        if rec is None:
            continue  # the reader recorded why
        bad = problem(rec, row, data.path)
        if bad is not None:
            problems.append(bad)
        else:
            good.append((row, rec))
    if not problems and not good:
        problems.append(Problem("no prompts", path=data.path, fix=fix))
    if problems:
        raise DataError(f"{len(problems)} problem(s) in prompts {data.path}:\n" + render_problems(problems))
    return data.path, good


def load_prompts(
    source: str,
    tokenizer: Any,
    *,
    split: str | None = None,
    chat_template: str | None = None,
    max_prompt_length: int | None = None,
) -> list[PromptRow]:
    """Every row of `source` as a `PromptRow`; DataError listing the bad rows (`PATH:ROW: field`)."""
    path, good = checked_prompt_rows(source, _problem, _FIX, split=split)
    template = read_template(chat_template) or getattr(tokenizer, "chat_template", None)
    out = []
    for row, rec in good:
        prompt = rec["prompt"]
        if isinstance(prompt, list):
            if not template:
                raise DataError(
                    "is a message list but the tokenizer has no chat template",
                    path=path,
                    row=row,
                    field="prompt",
                    fix="pass --chat-template FILE, or give the prompt as text",
                )
            text = str(
                tokenizer.apply_chat_template(
                    prompt, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            )
            ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        else:
            text = prompt
            ids = _bos_prefix(tokenizer) + list(tokenizer(text, add_special_tokens=False)["input_ids"])
        if max_prompt_length:
            ids = ids[-max_prompt_length:]
        columns = {k: v for k, v in rec.items() if k != "prompt"}
        out.append(PromptRow(ids, text, columns, row))
    return out


def preference_columns_note(rows: list[PromptRow], source: str, method: str) -> str:
    """A one-line notice when prompt rows are preference data (rows of a kind `data.layouts.detect_kind`
    finds: chosen / rejected, completion, responses), naming their preference columns
    (`data.layouts.ALL_FIELDS`): online `method` samples its own responses to each prompt and trains
    on none of those, which reach the reward only as keyword arguments; the offline methods train on
    them (--data). A prompt on several rows is drawn as often. "" otherwise (other columns, such as a
    reward's `answer`, are what prompt data is for)."""
    from preftune.data.layouts import ALL_FIELDS, detect_kind

    preference = [r for r in rows if detect_kind(r.columns) is not None]
    if not preference:
        return ""
    found = sorted({k for r in preference for k in r.columns if k in ALL_FIELDS}, key=ALL_FIELDS.index)
    distinct = len({r.text for r in rows})
    repeats = (
        f"; its {len(rows)} rows hold {distinct} distinct prompts (one on k rows is drawn k times an epoch)"
        if distinct < len(rows)
        else ""
    )
    return (
        f"{source}: {method} reads each row's 'prompt' and samples its own responses; the columns "
        f"{', '.join(found)} are not trained on (they reach the reward only as keyword arguments) — "
        f"preference data trains the offline methods: preftune train dpo --data {source}{repeats}"
    )
