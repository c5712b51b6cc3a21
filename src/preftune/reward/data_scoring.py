"""`preftune data score`: a reward (a reward-model folder, an ensemble, the task's verifier, a Python
function) applied to a data file.

    pairs        rows with prompt / chosen / rejected → the same rows with score_chosen / score_rejected;
                 `augment=True` turns the scored pairs into reward-augmented pairs (Zhang et al. 2024,
                 `preftune.data.transforms.reward_augmented_pairs`).
    completions  rows with prompt and a list `responses` (or `completions`) → ranked rows (responses
                 best first, with their scores); `best=True` keeps one row per prompt with the
                 highest-scoring response as `completion` and its `score` (best-of-n re-ranking).

Other columns are kept (and reach the reward function as keyword arguments, e.g. `answer`).
"""

from __future__ import annotations

from typing import Any

from preftune.data.rows import Problem, render_problems
from preftune.data.sources import read_source
from preftune.errors import DataError


def _rows(source: str) -> tuple[str, list[tuple[int, dict[str, Any]]], str]:
    """(path, rows, shape 'pairs' or 'completions'); DataError listing every bad row."""
    data = read_source(source)
    rows = [(r, rec) for r, rec in data.rows if rec is not None]
    first = rows[0][1] if rows else {}
    shape = "completions" if ("responses" in first or "completions" in first) else "pairs"
    need = ("prompt", "responses") if shape == "completions" else ("prompt", "chosen", "rejected")
    problems = list(data.problems)
    for row, rec in rows:
        if shape == "completions" and "responses" not in rec and "completions" in rec:
            rec["responses"] = rec.pop("completions")
        for name in need:
            if rec.get(name) is None:
                problems.append(Problem("missing", row=row, field=name, path=data.path,
                                        fix=f"give every row {', '.join(need)}"))  # fmt: skip
        values = rec.get("responses")
        if shape == "completions" and values is not None and (not isinstance(values, list) or not values):
            problems.append(Problem("is not a non-empty list of responses", row=row, field="responses",
                                    path=data.path, fix='write ["first reply", "second reply", ...]'))  # fmt: skip
    if not rows and not problems:
        problems.append(Problem("no rows", path=data.path, fix="give at least one row"))
    if problems:
        raise DataError(f"{len(problems)} problem(s) in {data.path}:\n" + render_problems(problems))
    return data.path, rows, shape


def _score(reward: Any, items: list[tuple[dict[str, Any], str, Any]]) -> list[float]:
    """Rewards of (row, prompt, response) items in one call; extra columns passed per item."""
    keys = sorted({k for rec, _, _ in items for k in rec} - {"prompt", "chosen", "rejected", "responses",
                                                           "score_chosen", "score_rejected", "scores"})  # fmt: skip
    columns = {k: [rec.get(k) for rec, _, _ in items] for k in keys}
    values = reward([p for _, p, _ in items], [c for _, _, c in items], **columns)
    return [float(v) for v in values]


def score_file(
    source: str, reward_spec: Any, *, augment: bool = False, best: bool = False
) -> tuple[list[dict[str, Any]], str]:
    """The scored rows of `source` (see the module docstring) and the input's shape."""
    from preftune.data.transforms import reward_augmented_pairs
    from preftune.errors import ConfigError
    from preftune.reward.registry import load_reward

    path, rows, shape = _rows(source)
    if augment and shape != "pairs":
        raise ConfigError(
            f"{path}: --augment builds reward-augmented pairs from pair rows (prompt/chosen/rejected)"
        )
    if best and shape != "completions":
        raise ConfigError(f"{path}: --best picks one response per prompt from rows with a 'responses' list")
    reward = load_reward(reward_spec)
    if shape == "pairs":
        items = [(rec, rec["prompt"], rec[side]) for _, rec in rows for side in ("chosen", "rejected")]
        scores = _score(reward, items)
        out = [dict(rec, score_chosen=scores[2 * i], score_rejected=scores[2 * i + 1])
               for i, (_, rec) in enumerate(rows)]  # fmt: skip
        return (reward_augmented_pairs(out) if augment else out), shape
    items = [(rec, rec["prompt"], r) for _, rec in rows for r in rec["responses"]]
    scores = _score(reward, items)
    out, at = [], 0
    for _, rec in rows:
        k = len(rec["responses"])
        mine = scores[at : at + k]
        at += k
        order = sorted(range(k), key=lambda i: -mine[i])  # stable: ties keep file order
        rest = {key: v for key, v in rec.items() if key not in ("responses", "scores")}
        if best:
            out.append({**rest, "completion": rec["responses"][order[0]], "score": mine[order[0]]})
        else:
            out.append({**rest, "responses": [rec["responses"][i] for i in order],
                        "scores": [mine[i] for i in order]})  # fmt: skip
    return out, shape
