"""`preftune train rm`: a reward model trained on preference pairs, prefix-shared, with exact resume.

    preftune train rm --model ./sft --data prefs.jsonl --out runs/rm --loss bt

The loop, run folder, checkpoints and exact resume are `preftune.reward.scorer_loop`'s (shared
with `preftune train prm`). Ranked rows become pairs (`ranked_pairs`). Each step's loss is Σ_pairs loss / pairs in the step (exact over micro-batches).
OUT/final/ is an `AutoModelForSequenceClassification(num_labels=1)` folder with its tokenizer.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, cast

import torch

from preftune.config import TrainConfig
from preftune.errors import ConfigError, DataError
from preftune.reward.losses import RMLoss, parse_rm_loss
from preftune.reward.scorer_loop import ScorerTask, check_config, claim, pair_step, run_scorer
from preftune.reward.scoring import branch_scores
from preftune.types import Example


def rm_examples(source: str, config: TrainConfig, tokenizer: Any, split: str | None) -> list[Example]:
    """Pairs of `source` (ranked rows → pairs by `ranked_pairs`); the first response is the chosen one."""
    from preftune.train.setup import load_examples

    pairwise = cast(Any, SimpleNamespace(kind="pairwise", needs_mismatched=False))
    examples = load_examples(source, config, pairwise, tokenizer, split=split, kind=config.kind)
    if any(e.kind != "pairwise" for e in examples):
        raise ConfigError(
            f"{source}: a reward model trains on pairs (prompt/chosen/rejected) or ranked rows; "
            "unpaired rows (one response with a label) have nothing to compare"
        )
    return examples


def pair_margins(batch: list[Example]) -> torch.Tensor | None:
    """Per-pair m for bt_margin / bt_scaled: the row's `margin` column, else the score gap of a scored
    pair (ranked rows' pairs, `score_chosen` / `score_rejected`); None when no pair has either (the
    losses then use m = 0 / 1)."""
    if not any(e.margin is not None or e.scores for e in batch):
        return None
    return torch.tensor([_margin(e) for e in batch])


def _margin(e: Example) -> float:
    if e.margin is not None:
        return float(e.margin)
    return float(e.scores[0] - e.scores[1]) if e.scores else 0.0


def check_margins(examples: list[Example], loss_fn: RMLoss, source: str) -> None:
    """A loss with a margin needs one on some pair (else it is plain bt: a forgotten column), and
    bt_scaled's strength m must be > 0 (m ≤ 0 would reverse or void the pair's preference)."""
    if not loss_fn.needs_margin or not examples:
        return
    if not any(e.margin is not None or e.scores for e in examples):
        raise DataError(
            "no pair has a margin, so bt_margin / bt_scaled would train as plain bt",
            path=source,
            field="margin",
            fix="add a 'margin' column (e.g. 1, 2, 3), give score_chosen / score_rejected, or use --loss bt",
        )
    if any(name == "bt_scaled" for name, _ in loss_fn.terms):
        bad = next((e for e in examples if (e.margin is not None or e.scores) and _margin(e) <= 0), None)
        if bad is not None:
            raise DataError(
                f"bt_scaled's strength is {_margin(bad):g}; it must be > 0",
                path=source,
                row=bad.source_row if bad.source_row >= 0 else None,
                field="margin" if bad.margin is not None else "score_rejected",
                fix="give chosen a positive margin over rejected (e.g. 1, 2, 3) or drop the row",
            )


def pair_scores(model: Any, batch: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_chosen [P], s_rejected [P]) of pairs, each pair one packed row (prefix-shared)."""
    scores = branch_scores(
        model,
        [e.prompt_ids for e in batch],
        [e.response_ids for e in batch],
        source_rows=[e.source_row for e in batch],
    )
    return scores[0::2], scores[1::2]


def _batch_losses(model: Any, part: list[Example], loss_fn: RMLoss | None) -> tuple[torch.Tensor, ...]:
    """(per-example losses, a, b): pairs give (loss, s_c, s_r); rated responses (loss_fn None, the
    `regression` loss) give ((s − rating)², s, rating). With M heads a pair's loss is the mean of the
    heads' losses and s_c, s_r the heads' mean scores."""
    if loss_fn is None:
        from preftune.reward.losses import regression
        from preftune.reward.rated import rated_scores

        scores, ratings = rated_scores(model, part)
        return regression(scores, ratings), scores, ratings
    s_c, s_r = pair_scores(model, part)
    m = pair_margins(part)
    if s_c.dim() == 2:  # M heads on one trunk: each head's loss, averaged over the heads
        m = None if m is None else m.to(s_c)[:, None].expand_as(s_c)
        return loss_fn(s_c, s_r, m).mean(-1), s_c.mean(-1), s_r.mean(-1)
    return loss_fn(s_c, s_r, m), s_c, s_r


def _step(model: Any, params: list[torch.nn.Parameter], opt: Any, sched: Any, batch: list[Example],
          loss_fn: RMLoss | None, config: TrainConfig) -> dict[str, float]:  # fmt: skip
    """One optimizer step (`pair_step`). accuracy / margin: of s_c > s_r and s_c − s_r for pairs; of
    s > rating and s − rating for ratings."""

    def part_losses(part: list[Example]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        losses, s_c, s_r = _batch_losses(model, part, loss_fn)
        return losses, (s_c > s_r).float(), s_c - s_r

    return pair_step(batch, part_losses, params, opt, sched, config)


@torch.no_grad()
def all_pair_scores(
    model: Any, examples: list[Example], batch_size: int = 8
) -> tuple[torch.Tensor, torch.Tensor]:
    """(s_chosen [P], s_rejected [P]) of every pair, in eval mode, `batch_size` pairs per forward."""
    was_training = model.training
    model.eval()
    parts = [pair_scores(model, examples[i : i + batch_size]) for i in range(0, len(examples), batch_size)]
    model.train(was_training)
    if not parts:
        return torch.zeros(0), torch.zeros(0)
    return torch.cat([c for c, _ in parts]).cpu(), torch.cat([r for _, r in parts]).cpu()


def pair_metrics(s_c: torch.Tensor, s_r: torch.Tensor, examples: list[Example], loss_fn: RMLoss,
                 gaps: list | None = None) -> dict[str, float]:  # fmt: skip
    """Held-out pairwise accuracy (ties count as wrong), mean loss, mean score gap s_c − s_r, and the
    calibration of P(chosen ≻ rejected) = σ(s_c − s_r) (`preftune.reward.evaluation.calibration`);
    the gaps [P] float64 are appended to `gaps` when given."""
    from preftune.reward.evaluation import calibration

    gap = (s_c - s_r).double()
    if gaps is not None:
        gaps.append(gap)
    n = max(len(examples), 1)
    total = float(loss_fn(s_c, s_r, pair_margins(examples)).sum()) if examples else 0.0
    out = {"loss": total / n, "accuracy": float((gap > 0).sum()) / n, "margin": float(gap.sum()) / n}
    return {**out, **calibration(gap)}


def evaluate_pairs(
    model: Any,
    examples: list[Example],
    loss_fn: RMLoss,
    batch_size: int = 8,
    *,
    gaps: list | None = None,
    how: str = "mean",
) -> dict[str, float]:
    """`pair_metrics` of `model` on `examples`; a model with M heads is scored by its heads' scores
    aggregated by `how` (`preftune.reward.ensemble.aggregate`)."""
    from preftune.reward.ensemble import aggregate

    s_c, s_r = all_pair_scores(model, examples, batch_size)
    if s_c.dim() == 2:
        s_c, s_r = aggregate(s_c.T, how), aggregate(s_r.T, how)
    return pair_metrics(s_c, s_r, examples, loss_fn, gaps)


def evaluate_held_out(
    model: Any, examples: list[Example], loss_fn: RMLoss | None, batch_size: int, how: str = "mean"
) -> dict[str, float]:
    """Pairs: `evaluate_pairs`; rated responses (loss_fn None): `preftune.reward.rated.evaluate_rated`."""
    if loss_fn is None:
        from preftune.reward.rated import evaluate_rated

        return evaluate_rated(model, examples, batch_size)
    return evaluate_pairs(model, examples, loss_fn, batch_size, how=how)


def head_kind(config: TrainConfig) -> str:
    """`--head`: scalar (a score head on the trunk, the default) or implicit (`preftune.reward.implicit`)."""
    head = str(config.hparams.get("head", "scalar"))
    if head not in ("scalar", "implicit"):
        raise ConfigError(
            f"--head {head}: use scalar (a score head, the default) or implicit (β log π_θ/π_ref)"
        )
    return head


def train_rm(config: TrainConfig, log: Any = print) -> Any:
    """Train a reward model: `config` as for `preftune train` (model, data, out, batch, optimizer,
    schedule, save_every, resume, eval_data) with method "rm" and `hparams["loss"]` a spec of
    `preftune.reward.losses` ("bt", "bt:1,center:0.01"; default "bt"). Returns the `RunResult`
    (final/ is the reward-model folder)."""
    if "ensemble" in config.hparams or ("aggregate" in config.hparams and "heads" not in config.hparams):
        from preftune.reward.ensemble_run import train_ensemble

        return train_ensemble(config, log)  # M seeds, each member a run of this function
    if head_kind(config) == "implicit":  # r = β log π_θ/π_ref, no scalar head
        from preftune.reward.implicit_training import train_implicit_rm

        return train_implicit_rm(config, log)
    loss = str(config.hparams.get("loss", "bt"))
    others = sorted(set(config.hparams) - {"loss", "ensemble", "aggregate", "heads", "head"})
    if others:
        raise ConfigError(
            f"preftune train rm takes --loss (e.g. bt, 'bt:1,center:0.01'), --ensemble M or --heads M, "
            f"--aggregate, and --head implicit (with --beta), not {', '.join(others)}"
        )
    loss_fn = None if loss == "regression" else parse_rm_loss(loss)  # regression: rating data
    check_config(config)
    if "heads" in config.hparams:
        from preftune.reward.ensemble_run import head_settings

        head_settings(config)  # refuses a bad count and rating data
    with claim(config):  # a failed run puts the folder back as it was (RunLock.undo)
        return _train(config, loss_fn, loss, log)


def _train(config: TrainConfig, loss_fn: RMLoss | None, loss: str, log: Any) -> Any:
    from preftune.reward.ensemble_run import head_settings, heads_manifest
    from preftune.reward.rated import rated_examples

    heads, how = head_settings(config) if "heads" in config.hparams else (1, "mean")

    def load(tokenizer: Any) -> ScorerTask:
        read = rm_examples if loss_fn is not None else rated_examples
        examples = read(config.data, config, tokenizer, config.split)
        held_out = read(config.eval_data, config, tokenizer, config.eval_split) if config.eval_data else []
        if loss_fn is not None:
            check_margins(examples, loss_fn, config.data)
        what = "pairs" if loss_fn is not None else "rated responses"
        return ScorerTask(
            f"preftune train rm ({loss}): {len(examples)} {what}",
            examples,
            lambda model, params, opt, sched, batch: _step(model, params, opt, sched, batch, loss_fn, config),
            shown="accuracy",
            evaluate=(
                (lambda model: evaluate_held_out(model, held_out, loss_fn, config.eval_batch_size or 8, how))
                if held_out
                else None
            ),
            files=heads_manifest(heads, how) if heads > 1 else {},
            num_labels=heads,
        )

    return run_scorer(config, load, log, f"rm ({loss})")
