"""Data transforms that build new preference data from raw records (docs/algorithms.md §1, §3).

They operate on *raw records* — the dicts of a JSONL file (`prompt`, `chosen`, `rejected`,
`score_chosen`, ... as in data/schema.py) — and return raw records, so their output goes through
the same validation, chat templates and tokenisation as any file:

    pairs = reward_augmented_pairs(records)
    data = prepare_examples(pairs, tokenizer=tok)

- `reward_augmented_pairs`: Zhang et al. 2024, reward-conditioned pairs.
- `curry_stages`: Pattnaik et al. 2024, Curry-DPO curriculum stages from ranked responses.
- `step_dpo_pairs`: Lai et al. 2024 (Step-DPO) pairs from step-annotated solutions.

Errors are DataError naming the record (1-based position in the input list) and the field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from preftune.errors import ConfigError, DataError

Record = dict[str, Any]


def _number(record: Record, row: int, field: str, fix: str) -> float:
    value = record.get(field)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise DataError(f"is {value!r}, expected a finite number", row=row, field=field, fix=fix)
    return float(value)


def _require(record: Record, row: int, field: str, fix: str) -> Any:
    if record.get(field) is None:
        raise DataError("is missing", row=row, field=field, fix=fix)
    return record[field]


def condition_prompt(prompt: Any, goal: str) -> Any:
    """Prefix `goal` to a text prompt, or to a message list's system message (added if absent)."""
    if isinstance(prompt, str):
        return goal + prompt
    messages = [dict(m) for m in prompt]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = goal + messages[0]["content"]
    else:
        messages.insert(0, {"role": "system", "content": goal.rstrip()})
    return messages


def reward_augmented_pairs(
    records: Sequence[Record], *, template: str = "[goal {score:g}] ", on_tie: str = "drop"
) -> list[Record]:
    """Each scored pair (x, y_w, y_l, s_w, s_l) → two reward-conditioned pairs (Zhang et al. 2024).

        [goal s_w] x : y_w ≻ y_l        and        [goal s_l] x : y_l ≻ y_w

    The model learns what a response of each quality looks like; at inference one asks for the top
    score. Scores come from `score_chosen` / `score_rejected`; `template` formats the goal (text
    prompts get it as a prefix, message prompts in the system message). Equal scores make the two
    pairs contradict each other, so tied pairs are dropped (`on_tie="drop"`) or rejected
    (`on_tie="error"`). The swapped pair swaps `margins` and turns a soft `label` p into 1 − p.
    """
    if on_tie not in ("drop", "error"):
        raise ConfigError(f"reward_augmented_pairs: on_tie={on_tie!r}, use 'drop' or 'error'")
    fix = "give both score_chosen and score_rejected (e.g. reward-model scores)"
    out: list[Record] = []
    for row, record in enumerate(records, start=1):
        prompt = _require(record, row, "prompt", "reward-augmented pairs need an explicit prompt")
        for field in ("chosen", "rejected"):
            _require(record, row, field, "a pairwise record needs chosen and rejected")
        s_w = _number(record, row, "score_chosen", fix)
        s_l = _number(record, row, "score_rejected", fix)
        if s_w == s_l:
            if on_tie == "error":
                raise DataError(
                    f"score_chosen equals score_rejected ({s_w:g})",
                    row=row,
                    field="score_rejected",
                    fix="drop tied pairs or pass on_tie='drop'",
                )
            continue
        forward = dict(record, prompt=condition_prompt(prompt, template.format(score=s_w)))
        swapped = dict(
            record,
            prompt=condition_prompt(prompt, template.format(score=s_l)),
            chosen=record["rejected"],
            rejected=record["chosen"],
            score_chosen=record["score_rejected"],
            score_rejected=record["score_chosen"],
        )
        if record.get("margins") is not None:
            swapped["margins"] = [record["margins"][1], record["margins"][0]]
        if record.get("label") is not None:
            swapped["label"] = 1.0 - float(record["label"])
        out += [forward, swapped]
    return out


def _ranked_pairs(record: Record, row: int, pairs: str) -> list[tuple[float, Record]]:
    """(score gap, pair record) for one ranked record; ties are not pairs."""
    prompt = _require(record, row, "prompt", "a ranked record needs a prompt")
    responses = _require(record, row, "responses", "a ranked record needs responses and scores")
    scores = _require(record, row, "scores", "give one score per response")
    if not isinstance(responses, list) or not isinstance(scores, list) or len(responses) != len(scores):
        raise DataError(
            "responses and scores must be lists of the same length",
            row=row,
            field="scores",
            fix="one score per response",
        )
    values = [_number({"scores": s}, row, "scores", "scores must be finite numbers") for s in scores]
    order = sorted(range(len(values)), key=lambda i: -values[i])  # best first; stable for ties
    firsts = order[:1] if pairs == "best_vs_rest" else order
    out = []
    for a_pos, a in enumerate(order):
        if a not in firsts:
            continue
        for b in order[a_pos + 1 :]:
            if values[a] > values[b]:
                pair = {
                    "prompt": prompt,
                    "chosen": responses[a],
                    "rejected": responses[b],
                    "score_chosen": scores[a],
                    "score_rejected": scores[b],
                }
                out.append((values[a] - values[b], pair))
    return out


def curry_stages(
    records: Sequence[Record], num_stages: int, *, pairs: str = "all", order: str = "global"
) -> list[list[Record]]:
    """Curry-DPO curriculum (Pattnaik et al. 2024): ranked records → `num_stages` lists of pairs, easy → hard.

    Every ranked record (`prompt`, `responses`, `scores`) gives pairs (y_i ≻ y_j, s_i > s_j): all of
    them (`pairs="all"`) or the best response against each other one (`"best_vs_rest"`, the
    paper's main setting). A pair is easier the larger its score gap s_i − s_j.
    order="global": all pairs sorted by gap, largest first (ties keep input order), cut into
    `num_stages` contiguous stages whose sizes differ by at most one.
    order="per_prompt" (the paper's): each prompt's pairs sorted by gap; its i-th of n pairs goes
    to stage ⌊i·num_stages/n⌋, so with best_vs_rest and num_stages = K − 1, stage k holds every
    prompt's k-th easiest pair.
    The trainer runs the stages in order, each stage's reference being the policy at the end of
    the previous one (docs/algorithms.md §3–4).
    """
    if num_stages < 1:
        raise ConfigError(f"curry_stages: num_stages={num_stages} must be ≥ 1")
    if pairs not in ("all", "best_vs_rest"):
        raise ConfigError(f"curry_stages: pairs={pairs!r}, use 'all' or 'best_vs_rest'")
    if order not in ("global", "per_prompt"):
        raise ConfigError(f"curry_stages: order={order!r}, use 'global' or 'per_prompt'")
    per_record = [_ranked_pairs(record, row, pairs) for row, record in enumerate(records, start=1)]
    stages: list[list[Record]] = [[] for _ in range(num_stages)]
    if order == "per_prompt":
        for scored in per_record:
            ranked = [p for _, p in sorted(scored, key=lambda gp: -gp[0])]  # stable for equal gaps
            for i, pair in enumerate(ranked):
                stages[i * num_stages // len(ranked)].append(pair)
    else:
        flat = [pair for scored in per_record for pair in scored]
        ordered = [p for _, p in sorted(flat, key=lambda gp: -gp[0])]
        base, extra = divmod(len(ordered), num_stages)
        start = 0
        for s in range(num_stages):
            size = base + (1 if s < extra else 0)
            stages[s] = ordered[start : start + size]
            start += size
    empty = [i + 1 for i, stage in enumerate(stages) if not stage]
    if empty:
        total = sum(len(st) for st in stages)
        raise DataError(
            f"{total} pairs leave stage(s) {empty} of {num_stages} empty",
            field="scores",
            fix="use fewer stages or more ranked records (tied scores make no pair)",
        )
    return stages


def step_dpo_pairs(records: Sequence[Record], *, separator: str = "\n") -> list[Record]:
    """Step-DPO pairs (Lai et al. 2024) from step-annotated solutions.

    Input record: `prompt` (text), `steps` (the solution's steps, list of text), `first_error`
    (0-based index of the first wrong step), and `correct_step` (text) or `correct_steps` (list):
    correct alternatives for that step. Output: one pair per correct alternative,

        prompt   = prompt + separator + steps[:first_error] joined by separator (+ separator)
        chosen   = a correct step,      rejected = steps[first_error]

    so the preference is on the first erroneous step only. Text prompts only: a chat prompt cannot
    carry a partial assistant answer through the chat template.
    """
    out: list[Record] = []
    for row, record in enumerate(records, start=1):
        prompt = _require(record, row, "prompt", "a step record needs the problem as prompt")
        if not isinstance(prompt, str):
            raise DataError(
                "is a message list; step pairs need a text prompt",
                row=row,
                field="prompt",
                fix="render the conversation to text first",
            )
        steps = _require(record, row, "steps", "give the solution as a list of step strings")
        if not isinstance(steps, list) or not all(isinstance(s, str) for s in steps):
            raise DataError(
                "must be a list of strings", row=row, field="steps", fix='write ["step 1", "step 2"]'
            )
        k = record.get("first_error")
        if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k < len(steps):
            raise DataError(
                f"is {k!r}, expected a step index in [0, {len(steps) - 1}]",
                row=row,
                field="first_error",
                fix="give the 0-based index of the first wrong step",
            )
        correct = record.get("correct_steps", record.get("correct_step"))
        alternatives = [correct] if isinstance(correct, str) else correct
        if (
            not isinstance(alternatives, list)
            or not alternatives
            or not all(isinstance(s, str) for s in alternatives)
        ):
            raise DataError(
                "is missing or not text",
                row=row,
                field="correct_steps",
                fix="give correct_step (text) or correct_steps (list of text) for the first wrong step",
            )
        context = prompt + separator + "".join(s + separator for s in steps[:k])
        for good in alternatives:
            out.append({"prompt": context, "chosen": good, "rejected": steps[k]})
    return out
