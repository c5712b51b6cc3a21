"""Step-level data for process reward models (PRMs): read, validate, tokenize.

One record is a problem and a solution split into steps, with a label per step:

    {"prompt": "12+9=\\n", "steps": ["2+9+0=11 r1", "1+0+1=2 r21", "answer: 21"], "labels": [1, 1, 1]}
    {"prompt": "12+9=\\n", "steps": ["2+9+0=10 r0", "1+0+1=2 r20", "answer: 20"], "first_error": 0}
    {"problem": "...", "steps": [...], "label": 2}      the official ProcessBench format (Zheng et al. 2024)
    {"prompt": "...", "completions": [...], "labels": [true, false]}   TRL's stepwise supervision (PRMTrainer)

`labels` are per-step targets: 1/0 (correct / wrong), a Monte-Carlo success rate in [0, 1]
(Math-Shepherd soft labels) or a PAV advantage in [−1, 1]. `first_error` (or ProcessBench's `label`)
is the 0-based index of the earliest wrong step, −1 when every step is right; it becomes labels
with the Math-Shepherd meaning "the solution so far can still be right" (Wang et al. 2024,
Math-Shepherd, §3.3: a step is good when its prefix reaches the answer): 1 before the first error,
0 from it on.

Tokens: the prompt (BOS where the tokenizer puts one), then each step followed by `separator`,
tokenized step by step; a step's score is read at its last token (the separator), so the K
solutions of a prompt are branches of one prefix-shared row.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from preftune.errors import DataError


@dataclass(frozen=True)
class PRMItem:
    """One solution: `labels` has one target per step; `first_error` is −1 when all steps are right,
    None when the labels are soft (no single first error)."""

    prompt: str
    steps: tuple[str, ...]
    labels: tuple[float, ...]
    first_error: int | None
    row: int = 0


def labels_from_first_error(first_error: int, num_steps: int) -> tuple[float, ...]:
    """1 before the first wrong step, 0 from it on; all 1 when `first_error` is −1."""
    k = num_steps if first_error < 0 else first_error
    return tuple(1.0 if i < k else 0.0 for i in range(num_steps))


def first_error_of(labels: tuple[float, ...] | list[float], threshold: float = 0.5) -> int:
    """Index of the first label below `threshold`, −1 when none is."""
    return next((i for i, v in enumerate(labels) if v < threshold), -1)


def _fail(message: str, path: str, row: int, field: str, fix: str) -> DataError:
    return DataError(message, path=path, row=row, field=field, fix=fix)


def _steps(record: dict[str, Any], path: str, row: int) -> tuple[str, ...]:
    from preftune.reward.data_check import steps_field

    field = steps_field(record)
    steps = record.get(field)
    if not isinstance(steps, list) or not steps or not all(isinstance(s, str) and s for s in steps):
        raise _fail(
            f"is {type(steps).__name__ if steps is not None else 'missing'}"
            + (" or holds an empty or non-text step" if isinstance(steps, list) and steps else "")
            + (" (empty)" if steps == [] else ""),
            path,
            row,
            field,
            'give the solution as a non-empty list of non-empty step strings, e.g. ["2+9+0=11 r1", "answer: 11"]',
        )
    return tuple(steps)


def _index(record: dict[str, Any], key: str, n: int, path: str, row: int) -> int:
    k = record[key]
    if isinstance(k, bool) or not isinstance(k, int) or not -1 <= k < n:
        raise _fail(
            f"is {k!r}, expected -1 (no wrong step) or a step index in [0, {n - 1}]",
            path,
            row,
            key,
            "give the 0-based index of the first wrong step, or -1 when all steps are right",
        )
    return k


def _labels(record: dict[str, Any], n: int, path: str, row: int) -> tuple[float, ...]:
    labels = record["labels"]
    if not isinstance(labels, list) or len(labels) != n:
        got = f"{len(labels)} labels" if isinstance(labels, list) else f"{labels!r}"
        raise _fail(
            f"has {got} for {n} steps", path, row, "labels", "give one label per step (1 right, 0 wrong)"
        )
    for i, v in enumerate(labels):
        if isinstance(v, bool):
            labels[i] = float(v)
        elif not isinstance(v, (int, float)) or not math.isfinite(v):
            raise _fail(f"label {i} is {v!r}, expected a finite number", path, row, "labels",
                        "write 1 (right) / 0 (wrong) or a target in [0, 1]")  # fmt: skip
    return tuple(float(v) for v in labels)


def parse_record(record: dict[str, Any], path: str = "<records>", row: int = 1) -> PRMItem:
    """One PRM record → PRMItem; DataError `PATH:ROW: field 'NAME': what — fix` when unusable."""
    prompt = record.get("prompt", record.get("problem"))
    if not isinstance(prompt, str) or not prompt:
        raise _fail("is missing or not text", path, row, "prompt",
                    "give the problem as a text 'prompt' (or ProcessBench's 'problem')")  # fmt: skip
    steps = _steps(record, path, row)
    keys = [k for k in ("labels", "first_error", "label") if record.get(k) is not None]
    if len(keys) != 1:
        raise _fail(
            "no step labels" if not keys else f"labels given twice ({', '.join(keys)})",
            path,
            row,
            "labels",
            "give exactly one of 'labels' (one per step), 'first_error' or 'label' (index, -1 = none)",
        )
    if keys[0] == "labels":
        labels = _labels(record, len(steps), path, row)
        hard = all(v in (0.0, 1.0) for v in labels)
        first = first_error_of(labels) if hard else None
        return PRMItem(prompt, steps, labels, first, row)
    k = _index(record, keys[0], len(steps), path, row)
    return PRMItem(prompt, steps, labels_from_first_error(k, len(steps)), k, row)


def read_prm_data(source: str | Path | list[dict[str, Any]], split: str | None = None) -> list[PRMItem]:
    """Every record of a JSONL/JSON file (or a list of dicts) as PRMItems; invalid rows raise one
    DataError listing each (`PATH:ROW: field 'NAME': what — fix`)."""
    from preftune.data.sources import read_source
    from preftune.reward.data_check import parse_steps

    data = read_source(source, split=split)
    items, problems = parse_steps(data)  # every row parsed, every problem kept
    if len(problems) == 1:
        p = problems[0]
        raise DataError(p.message, path=p.path or data.path, row=p.row, field=p.field, fix=p.fix)
    if problems:
        from preftune.data.rows import render_problems

        raise DataError(f"{len(problems)} problems in step data {data.path}:\n" + render_problems(problems))
    return items


@dataclass(frozen=True)
class EncodedItem:
    """Token ids of one item: the prompt, the response (every step + separator) and, per step, the
    index within the response of the token its score is read at."""

    prompt_ids: list[int]
    response_ids: list[int]
    ends: list[int]


def encode_steps(tokenizer: Any, prompt: str, steps: list[str] | tuple[str, ...],
                 separator: str = "\n") -> EncodedItem:  # fmt: skip
    """Tokenize a prompt and its steps, each step as `step + separator` on its own (so its last token
    is the same whatever follows)."""
    from preftune.data.formatting import _bos_prefix

    prompt_ids = _bos_prefix(tokenizer) + tokenizer(prompt, add_special_tokens=False)["input_ids"]
    response: list[int] = []
    ends: list[int] = []
    for step in steps:
        ids = tokenizer(step + separator, add_special_tokens=False)["input_ids"]
        response += ids
        ends.append(len(response) - 1)
    return EncodedItem(prompt_ids, response, ends)
