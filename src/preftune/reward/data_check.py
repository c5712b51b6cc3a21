"""`preftune data check` of reward-model data: step labels (`train prm`) and ratings (`train rm --loss
regression`), every row read by the parser training uses, every problem listed, else a summary.

    looks_like_steps(record) / looks_like_ratings(record)    detection from a file's first record
    parse_steps(data)                                        → (PRMItems, problems); `read_prm_data`'s
    check_steps(data) / check_ratings(data)                  → (problems, summary line)
"""

from __future__ import annotations

import statistics
from typing import Any

from preftune.data.rows import Problem
from preftune.errors import DataError

STEP_LABELS = ("labels", "first_error", "label")


def steps_field(record: dict[str, Any]) -> str:
    """The field holding a record's steps: `steps`, or TRL's stepwise-supervision `completions` (a
    list of step texts with `labels`, `PRMTrainer`'s format) when the record has no `steps`."""
    comps = record.get("completions")
    if "steps" not in record and isinstance(comps, list) and all(isinstance(c, str) for c in comps):
        return "completions"
    return "steps"


def looks_like_steps(record: dict[str, Any]) -> bool:
    """A PRM record: a `steps` list (TRL: `completions`) and one of `labels`, `first_error` or
    ProcessBench's `label`."""
    return steps_field(record) in record and any(k in record for k in STEP_LABELS)


def looks_like_ratings(record: dict[str, Any]) -> bool:
    """A rated response: `response` and `rating` (SteerLM / HelpSteer2 style)."""
    return "rating" in record and "response" in record


def parse_steps(data: Any) -> tuple[list[Any], list[Problem]]:
    """(PRMItems, problems) of read data (`read_source`): every record parsed as `train prm` parses it
    (`parse_record`), every problem kept."""
    from preftune.reward.prm_data import parse_record

    problems = list(data.problems)
    items = []
    for row, rec in data.rows:
        if rec is None:
            continue
        try:
            items.append(parse_record(rec, data.path, row))
        except DataError as err:
            problems.append(Problem(err.problem, row=err.row, field=err.field, fix=err.fix, path=err.path))
    if not items and not problems:
        problems.append(Problem("holds no records", path=data.path, fix="write one JSON object per line"))
    return items, problems


def check_steps(data: Any) -> tuple[list[Problem], str]:
    """`parse_steps`'s problems, and the summary line of the items."""
    items, problems = parse_steps(data)
    steps = [len(it.steps) for it in items]
    wrong = sum(it.first_error is not None and it.first_error >= 0 for it in items)
    soft = sum(it.first_error is None for it in items)
    summary = (
        f"{data.path}: OK — {len(items)} solutions of step-labelled data (kind steps: preftune train prm), "
        f"{sum(steps)} steps ({min(steps, default=0)}–{max(steps, default=0)} per solution); "
        f"{wrong} with a wrong step, {len(items) - wrong - soft} all right"
        + (f", {soft} with soft labels (targets in [0, 1])" if soft else "")
    )
    return problems, summary


def check_ratings(data: Any) -> tuple[list[Problem], str]:
    """Every record of read data as `train rm --loss regression` checks it (`rated._row_problems`)."""
    from preftune.reward.rated import _row_problems

    problems = list(data.problems)
    rows = [(r, rec) for r, rec in data.rows if rec is not None]
    for row, rec in rows:
        problems += _row_problems(rec, row, data.path)
    if not rows and not problems:
        problems.append(Problem("no rows", path=data.path, fix="give rows with prompt, response, rating"))
    ratings = [float(rec["rating"]) for _, rec in rows if isinstance(rec.get("rating"), (int, float))]
    prompts = {str(rec.get("prompt")) for _, rec in rows}
    summary = (
        f"{data.path}: OK — {len(rows)} rated responses to {len(prompts)} prompts (kind rated: preftune "
        f"train rm --loss regression); ratings {min(ratings, default=0):g} to {max(ratings, default=0):g}, "
        f"mean {statistics.fmean(ratings) if ratings else 0:.3g}"
    )
    return problems, summary
