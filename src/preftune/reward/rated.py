"""Rating data for a reward model's `regression` loss: rows `prompt`, `response`, `rating`.

    preftune train rm --model ./sft --data ratings.jsonl --out runs/rm --loss regression

Each rated response is one example (prompt + response, EOS appended, as pairs are); a step's loss is
the mean of (s(x, y) − rating)² over its responses (SteerLM / HelpSteer2). Rows are checked first and
every problem is reported as `PATH:ROW: field 'NAME': what — fix`.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from preftune.config import TrainConfig
from preftune.data.rows import Problem, render_problems
from preftune.errors import DataError
from preftune.types import Example

_FIX = {
    "prompt": "give each row a 'prompt' (text or messages)",
    "response": "give each row the rated 'response' (text or messages)",
    "rating": "give each row a finite number 'rating', e.g. 3.5",
}


def _row_problems(rec: dict[str, Any], row: int, path: str) -> list[Problem]:
    out = []
    for name in ("prompt", "response"):
        value = rec.get(name)
        if (
            value is None
            or (isinstance(value, str) and not value.strip())
            or not isinstance(value, (str, list))
        ):
            what = (
                "missing"
                if value is None
                else "empty text"
                if isinstance(value, str)
                else f"is a {type(value).__name__}"
            )
            out.append(Problem(what, row=row, field=name, fix=_FIX[name], path=path))
    rating = rec.get("rating")
    if isinstance(rating, bool) or not isinstance(rating, (int, float)) or not math.isfinite(rating):
        what = "missing" if rating is None else f"is {rating!r}, expected a finite number"
        out.append(Problem(what, row=row, field="rating", fix=_FIX["rating"], path=path))
    return out


def rated_examples(source: str, config: TrainConfig, tokenizer: Any, split: str | None) -> list[Example]:
    """One unpaired `Example` per rated response; `scores` = [rating], `source_row` the file's row."""
    from preftune.data.pipeline import prepare_examples
    from preftune.data.sources import read_source

    data = read_source(source, split=split)
    problems = list(data.problems)
    rows = [(r, rec) for r, rec in data.rows if rec is not None]
    if rows and "rating" not in rows[0][1] and {"chosen", "rejected"} <= set(rows[0][1]):
        raise DataError("holds preference pairs (prompt, chosen, rejected), not ratings", path=data.path,
                        row=rows[0][0], fix="--loss regression fits rated responses (prompt, response, rating): "
                        "train pairs with --loss bt (or bt_margin, ...)")  # fmt: skip
    for row, rec in rows:
        problems += _row_problems(rec, row, data.path)
    if not rows and not problems:
        problems.append(Problem("no rows", path=data.path, fix="give rows with prompt, response, rating"))
    if problems:
        raise DataError(
            f"{len(problems)} problem(s) in rating data {data.path}:\n" + render_problems(problems)
        )
    records = [{"prompt": rec["prompt"], "completion": rec["response"], "label": True} for _, rec in rows]
    prepared = prepare_examples(
        records, tokenizer=tokenizer, kind="unpaired", max_length=config.max_length,
        max_prompt_length=config.max_prompt_length, max_completion_length=config.max_completion_length,
        truncation=config.truncation, chat_template=config.chat_template, add_eos=config.add_eos,
        use_cache=False, num_proc=1,
    )  # fmt: skip
    out = []
    for e in prepared.examples:
        row, rec = rows[e.source_row - 1]
        out.append(
            Example(
                e.prompt_ids, e.response_ids, kind="unpaired", scores=[float(rec["rating"])], source_row=row
            )
        )
    return out


def rated_scores(model: Any, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(scores [N], ratings [N]) of rated responses; runs of equal prompts share a packed row."""
    from preftune.reward.scoring import branch_scores

    prompts: list[list[int]] = []
    branches: list[list[list[int]]] = []
    for e in batch:
        if prompts and prompts[-1] == e.prompt_ids:
            branches[-1].append(e.response_ids[0])
        else:
            prompts.append(e.prompt_ids)
            branches.append([e.response_ids[0]])
    scores = branch_scores(model, prompts, branches)
    ratings = [e.scores[0] if e.scores else 0.0 for e in batch]
    return scores, torch.tensor(ratings, dtype=scores.dtype, device=scores.device)


def rated_metrics(scores: torch.Tensor, ratings: torch.Tensor, batch: list[Example]) -> dict[str, float]:
    """mse (the loss), and accuracy: of the pairs of responses to the same prompt with different
    ratings, the fraction the scores order as the ratings do (NaN when there is no such pair)."""
    mse = float(((scores - ratings) ** 2).mean()) if len(batch) else 0.0
    right = pairs = 0
    for i in range(len(batch)):
        for j in range(i + 1, len(batch)):
            if batch[i].prompt_ids == batch[j].prompt_ids and ratings[i] != ratings[j]:
                pairs += 1
                right += int(bool((scores[i] - scores[j]) * (ratings[i] - ratings[j]) > 0))
    return {"loss": mse, "mse": mse, "accuracy": right / pairs if pairs else float("nan")}


@torch.no_grad()
def evaluate_rated(model: Any, examples: list[Example], batch_size: int = 8) -> dict[str, float]:
    """`rated_metrics` over all of `examples` (eval mode)."""
    was_training = model.training
    model.eval()
    parts = [rated_scores(model, examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    model.train(was_training)
    if not parts:
        return rated_metrics(torch.zeros(0), torch.zeros(0), [])
    return rated_metrics(torch.cat([s for s, _ in parts]), torch.cat([r for _, r in parts]), examples)
