"""`preftune train prm`: a process reward model trained on step labels, prefix-shared, with exact resume.

    preftune train prm --model ./sft --data steps.jsonl --out runs/prm --loss prm_bce

Data: `preftune.reward.prm_data` (prompt, steps, labels or first_error; the official ProcessBench
rows too). Each step of a solution is scored at its last token (`preftune.reward.prm`); solutions to
one prompt in a batch share one packed row. A step's loss is Σ over labelled steps / steps in the
optimizer step (exact whatever the micro-batch size). The run folder, lock, checkpoints and
`--resume` rules are those of `preftune train rm`; OUT/final/ is an
`AutoModelForSequenceClassification(num_labels=1)` folder with its tokenizer and `prm.json` (the
loss, separator and default aggregation), which makes the folder a process reward for `--reward`.
With `eval_data` (hard labels) the ProcessBench metrics of those items are logged as split "eval".
"""

from __future__ import annotations

import json
from typing import Any

import torch

from preftune.config import TrainConfig
from preftune.errors import ConfigError, DataError
from preftune.reward.prm import PRM_LOSSES, score_encoded
from preftune.reward.prm_data import EncodedItem, PRMItem, encode_steps, read_prm_data
from preftune.reward.scorer_loop import (
    ScorerTask,
    check_config,
    claim,
    optimizer_step,
    run_scorer,
)

PRM_FILE = "prm.json"
HPARAMS = ("loss", "separator", "aggregation", "head")


def _settings(config: TrainConfig) -> dict[str, str]:
    hp = {k: str(v) for k, v in config.hparams.items() if k != "head"}
    others = sorted(set(hp) - set(HPARAMS))
    if others:
        raise ConfigError(
            f"preftune train prm takes --loss (prm_bce, pav_mse), --separator and --aggregation, not {', '.join(others)}"
        )
    out = {"loss": hp.get("loss", "prm_bce"), "separator": hp.get("separator", "\n"),
           "aggregation": hp.get("aggregation", "min")}  # fmt: skip
    if out["loss"] not in PRM_LOSSES:
        raise ConfigError(f"unknown PRM loss '{out['loss']}' (known: {', '.join(PRM_LOSSES)})")
    from preftune.reward.prm import AGGREGATIONS

    if out["aggregation"] not in AGGREGATIONS:
        raise ConfigError(
            f"unknown step aggregation '{out['aggregation']}' (known: {', '.join(AGGREGATIONS)})"
        )
    return out


def prm_items(source: str, split: str | None, loss: str) -> list[PRMItem]:
    """The items of `source`; for prm_bce every label must lie in [0, 1]."""
    items = read_prm_data(source, split)
    if loss == "prm_bce":
        for it in items:
            bad = next((v for v in it.labels if not 0.0 <= v <= 1.0), None)
            if bad is not None:
                raise DataError(f"holds {bad!r}; prm_bce trains on labels in [0, 1]", path=source, row=it.row,
                                field="labels", fix="give 1/0 or a success rate, or train with --loss pav_mse")  # fmt: skip
    return items


def _step(model: Any, params: list[torch.nn.Parameter], opt: Any, sched: Any, batch: list[tuple[PRMItem, EncodedItem]],
          loss: str, config: TrainConfig) -> dict[str, float]:  # fmt: skip
    """One optimizer step: Σ over micro-batches of Σ_steps loss / steps in the batch."""
    micro = config.micro_batch_size or config.batch_size
    n_steps = sum(len(it.labels) for it, _ in batch)
    total = correct = 0.0
    for start in range(0, len(batch), micro):
        part = batch[start : start + micro]
        scores = torch.cat(score_encoded(model, [e for _, e in part]))
        labels = torch.tensor([v for it, _ in part for v in it.labels], device=scores.device)
        losses = PRM_LOSSES[loss](scores, labels)
        (losses.sum() / n_steps).backward()
        total += float(losses.detach().sum())
        if loss == "prm_bce":
            correct += float(((scores.detach() > 0) == (labels > 0.5)).sum())
    norm, lr = optimizer_step(params, opt, sched, config)
    out = {"loss": total / n_steps, "grad_norm": norm, "lr": lr, "steps": float(n_steps)}
    return {**out, "step_accuracy": correct / n_steps} if loss == "prm_bce" else out


def train_prm(config: TrainConfig, log: Any = print) -> Any:
    """Train a PRM: `config` as for `preftune train rm`, method "prm", `hparams` loss (prm_bce | pav_mse),
    separator (default newline) and aggregation (the reward's default: min). Returns the `RunResult`."""
    from preftune.reward.training import head_kind

    if head_kind(config) == "implicit":  # q_θ = partial sums of β log π_θ/π_ref
        from preftune.reward.implicit_training import train_implicit_prm

        return train_implicit_prm(config, log)
    settings = _settings(config)
    check_config(config)
    with claim(config):  # a failed run puts the folder back as it was (RunLock.undo)
        return _train(config, settings, log)


def _train(config: TrainConfig, settings: dict[str, str], log: Any) -> Any:

    loss, sep = settings["loss"], settings["separator"]

    def load(tokenizer: Any) -> ScorerTask:
        items = prm_items(config.data, config.split, loss)
        data = [(it, encode_steps(tokenizer, it.prompt, it.steps, sep)) for it in items]
        evaluate = None
        if config.eval_data:  # ProcessBench metrics of the held-out items (τ on their dev split)
            from preftune.reward.processbench import evaluate_values, first_errors, prm_step_values

            held = prm_items(config.eval_data, config.eval_split, loss)
            labels = first_errors(held, config.eval_data)
            size = config.eval_batch_size or 16

            def evaluate(model: Any) -> dict[str, float]:
                values = prm_step_values(model, tokenizer, held, loss=loss, separator=sep, batch_items=size)
                return evaluate_values(values, labels)

        return ScorerTask(
            f"preftune train prm ({loss}): {len(items)} solutions",
            data,
            lambda model, params, opt, sched, batch: _step(model, params, opt, sched, batch, loss, config),
            evaluate=evaluate,
            sorted_batches=True,
            files={PRM_FILE: json.dumps(settings, indent=1)},
        )

    return run_scorer(config, load, log, f"prm ({loss})")
