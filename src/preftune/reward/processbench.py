"""ProcessBench (Zheng et al. 2024): find the earliest wrong step of a solution.

An item is a problem, its solution's steps and `label`, the 0-based index of the earliest wrong step
(−1 when every step is right). A PRM predicts the first step whose score falls below a threshold τ
(−1 when none does). Metrics (Zheng et al. 2024, §3):

    acc_err   = fraction of erroneous items (label ≥ 0) whose predicted index equals the label
    acc_corr  = fraction of correct items (label = −1) predicted −1
    f1        = 2 · acc_err · acc_corr / (acc_err + acc_corr)   (their harmonic mean; 0 when both are 0)

τ is chosen on a dev split (the F1-maximising value among the midpoints of the dev scores) and the
metrics reported on the rest. The official JSONL rows are `id`, `generator`, `problem`, `steps`,
`final_answer_correct`, `label`; `processbench_from_task` writes the same fields for the built-in task.
"""

from __future__ import annotations

import json
import random
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError, DataError


def first_below(values: Sequence[float], threshold: float) -> int:
    """Index of the first step value below `threshold`, −1 when none is."""
    return next((i for i, v in enumerate(values) if v < threshold), -1)


def processbench_metrics(predicted: Sequence[int], labels: Sequence[int]) -> dict[str, float]:
    """acc_err, acc_corr, f1 (see the module doc) and the item counts."""
    if len(predicted) != len(labels):
        raise ConfigError(f"{len(predicted)} predictions for {len(labels)} labels")
    err = [p == y for p, y in zip(predicted, labels) if y >= 0]
    corr = [p == -1 for p, y in zip(predicted, labels) if y < 0]
    a_err = sum(err) / len(err) if err else 0.0
    a_corr = sum(corr) / len(corr) if corr else 0.0
    f1 = 2 * a_err * a_corr / (a_err + a_corr) if a_err + a_corr > 0 else 0.0
    return {"acc_err": a_err, "acc_corr": a_corr, "f1": f1,
            "erroneous": float(len(err)), "correct": float(len(corr))}  # fmt: skip


def choose_threshold(values: Sequence[Sequence[float]], labels: Sequence[int]) -> float:
    """The τ with the best F1 on (values, labels): candidates are the midpoints between consecutive
    distinct step values (and one below / above all); ties go to the candidate closest to 0.5."""
    flat = sorted({float(v) for vs in values for v in vs})
    if not flat:
        return 0.5
    cands = [flat[0] - 1.0, *((a + b) / 2 for a, b in zip(flat, flat[1:])), flat[-1] + 1.0]
    best = max(
        cands,
        key=lambda t: (
            processbench_metrics([first_below(v, t) for v in values], labels)["f1"],
            -abs(t - 0.5),
        ),
    )
    return float(best)


def dev_test_split(n: int) -> tuple[list[int], list[int]]:
    """Item indices of the dev split (every third item: 0, 3, 6, …) and of the test split (the rest)."""
    dev = list(range(0, n, 3))
    return dev, [i for i in range(n) if i % 3]


def evaluate_values(values: Sequence[Sequence[float]], labels: Sequence[int],
                    threshold: float | None = None) -> dict[str, float]:  # fmt: skip
    """ProcessBench metrics of step values: τ chosen on the dev split (or `threshold`), metrics on the
    test split (all items when τ is given)."""
    if threshold is None:
        dev, test = dev_test_split(len(labels))
        threshold = choose_threshold([values[i] for i in dev], [labels[i] for i in dev])
    else:
        test = list(range(len(labels)))
    pred = [first_below(values[i], threshold) for i in test]
    return {**processbench_metrics(pred, [labels[i] for i in test]), "threshold": threshold}


_VALUE = re.compile(r"=(\d+)")


def _corrupt(line: str, rng: random.Random) -> str:
    """`line` with one number changed: the step's value (after '=') or, on an answer line, the answer."""
    m = _VALUE.search(line) if not line.startswith("answer:") else re.search(r"(\d+)$", line)
    if m is None:
        return line + "0"
    old = int(m.group(1))
    new = old + rng.choice([d for d in (-2, -1, 1, 2, 10) if old + d >= 0])
    return line[: m.start(1)] + str(new) + line[m.end(1) :]


def processbench_from_task(n: int, *, level: int = 1, ops: str = "+-*", seed: int = 0, error_rate: float = 0.5,
                           exclude: set[str] | None = None) -> list[dict[str, Any]]:  # fmt: skip
    """A ProcessBench-style set from the built-in arithmetic task: `n` reference solutions, a fraction
    `error_rate` of them with one line's number changed (later lines kept); `label` is the verifier's
    first wrong line (exact), −1 for untouched solutions. Fields as the official JSONL. Prompts in
    `exclude` are not drawn (a held-out set apart from a training set)."""
    from preftune.tasks.arithmetic import ArithmeticTask, verify

    task = ArithmeticTask(level=level, ops=ops)
    rng = random.Random(f"processbench:{seed}")
    items: list[dict[str, Any]] = []
    for i, problem in enumerate(task.problems(n, seed=seed, exclude=exclude)):
        steps = task.solution(problem).split("\n")
        if rng.random() < error_rate:
            k = rng.randrange(len(steps))
            steps[k] = _corrupt(steps[k], rng)
        v = verify(problem.prompt, "\n".join(steps))
        label = -1 if v.first_error is None else v.first_error
        items.append({"id": f"arithmetic-{seed}-{i}", "generator": "reference+corruption",
                      "problem": problem.prompt, "steps": steps,
                      "final_answer_correct": v.correct, "label": label})  # fmt: skip
    return items


@torch.no_grad()
def prm_step_values(model: Any, tokenizer: Any, items: Sequence[Any], *, loss: str = "prm_bce",
                    separator: str = "\n", batch_items: int = 16) -> list[list[float]]:  # fmt: skip
    """Per item (a `PRMItem`), the PRM's step values: σ(s_k) (prm_bce) or s_k (pav_mse); consecutive
    items with the same prompt share one packed row."""
    from preftune.reward.prm import score_encoded, step_probabilities
    from preftune.reward.prm_data import encode_steps

    was_training = model.training
    model.eval()
    out: list[list[float]] = []
    for start in range(0, len(items), batch_items):
        part = [
            encode_steps(tokenizer, it.prompt, it.steps, separator)
            for it in items[start : start + batch_items]
        ]
        out += [step_probabilities(s, loss).tolist() for s in score_encoded(model, part)]
    model.train(was_training)
    return out


def evaluate_prm_folder(folder: str | Path, data: str, *, threshold: float | None = None,
                        batch_items: int = 16, separator: str | None = None,
                        step_value: str | None = None) -> dict[str, float]:  # fmt: skip
    """ProcessBench metrics of the PRM in `folder` (OUT/final of `preftune train prm`) on the items of
    `data` (ProcessBench JSONL or PRM records with hard labels): τ on the dev split unless given.
    `separator` replaces the folder's own: a PRM trained on characters (`character_record`, separator
    "") is read at the line ends of line-level items with `separator="\n"`. An implicit RM folder
    (`preftune.reward.implicit`) is valued by q_θ at each step's end, or by `step_value` "delta"."""
    from preftune.data.formatting import load_tokenizer
    from preftune.reward.prm_data import read_prm_data
    from preftune.reward.scoring import load_scorer

    items = read_prm_data(data)
    labels = first_errors(items, data)
    from preftune.reward.implicit import is_implicit

    if is_implicit(folder):  # q_θ at step ends (Yuan et al. 2024, Proposition 3.1)
        from preftune.reward.implicit import load_implicit
        from preftune.reward.implicit_training import item_step_values

        irm, found = load_implicit(folder)
        sep = found["separator"] if separator is None else separator
        values = item_step_values(irm, load_tokenizer(str(folder)), items, sep, step_value or found["step_value"],
                                  batch_items)  # fmt: skip
        return {"items": float(len(items)), **evaluate_values(values, labels, threshold)}
    settings = read_prm_settings(folder)
    model = load_scorer(folder)
    values = prm_step_values(model, load_tokenizer(str(folder)), items, loss=settings["loss"],
                             separator=settings["separator"] if separator is None else separator,
                             batch_items=batch_items)  # fmt: skip
    return {"items": float(len(items)), **evaluate_values(values, labels, threshold)}


def first_errors(items: Sequence[Any], path: str) -> list[int]:
    """The first wrong step of each `PRMItem` (−1: none); DataError on an item with soft labels."""
    soft = next((it for it in items if it.first_error is None), None)
    if soft is not None:
        raise DataError("has soft labels: ProcessBench needs the first wrong step", path=path, row=soft.row,
                        field="labels", fix="give 'label' / 'first_error', or 0/1 labels")  # fmt: skip
    return [int(it.first_error) for it in items]


def read_prm_settings(folder: str | Path) -> dict[str, str]:
    """The `prm.json` of a PRM folder (loss, separator, aggregation); a plain sequence-classifier
    folder reads as prm_bce with newline-separated steps."""
    path = Path(folder) / "prm.json"
    settings = {"loss": "prm_bce", "separator": "\n", "aggregation": "min"}
    if path.is_file():
        settings.update(json.loads(path.read_text(encoding="utf-8")))
    return settings
