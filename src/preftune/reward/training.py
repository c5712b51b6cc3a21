"""`preftune train rm`: a reward model trained on preference pairs, prefix-shared, with exact resume.

    preftune train rm --model ./sft --data prefs.jsonl --out runs/rm --loss bt

A small loop of its own (a reward model has scores, not log-probs, and no reference), built from the
training parts: the run folder's lock and resume rules (`train/runfolder.py`), checkpoints
(`train/checkpoint.py`), the optimizer and scheduler builders, and the seeded batches of
`batch_indices`, so a resumed run takes the same steps as an unbroken one. Ranked rows become pairs
(`ranked_pairs`). Each step's loss is Σ_pairs loss / pairs in the step (exact over micro-batches).
OUT/final/ is an `AutoModelForSequenceClassification(num_labels=1)` folder with its tokenizer.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import torch

from preftune.config import TrainConfig, config_to_dict
from preftune.errors import ConfigError, DataError
from preftune.reward.losses import RMLoss, parse_rm_loss
from preftune.reward.scoring import branch_scores, load_scorer
from preftune.train import checkpoint as ckpt
from preftune.train import runfolder
from preftune.types import Example


def _check(config: TrainConfig) -> None:
    for name in ("model", "data", "out"):
        if not getattr(config, name):
            raise ConfigError(f"'{name}' is required for preftune train rm (--{name})")
    if config.lora or config.fsdp or config.stages > 1 or config.rounds > 1:
        raise ConfigError(
            "preftune train rm trains the whole model in one process and one phase: remove "
            "lora / fsdp / stages / rounds"
        )


def _claim(config: TrainConfig) -> runfolder.RunLock:
    """Lock OUT; refuse to overwrite a run; on --resume, refuse settings that differ from config.yaml."""
    out = Path(config.out)
    runfolder._make_folder(out)
    lock = runfolder.RunLock(out)
    try:
        ckpt.remove_partial(out / "checkpoints")
        saved = out / "config.yaml"
        if config.resume and saved.is_file():
            _check_same(config, saved)
        elif not config.resume and runfolder.has_run(out):
            raise ConfigError(
                f"run folder {out} already has a run — pass --resume to continue it, or another --out"
            )
        import yaml

        runfolder.write_atomic(
            saved, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
        )
    except BaseException:
        lock.release()
        raise
    return lock


def _check_same(config: TrainConfig, saved_path: Path) -> None:
    import yaml

    old = yaml.safe_load(saved_path.read_text(encoding="utf-8")) or {}
    new = config_to_dict(config)
    skip = {*runfolder._NOT_COMPARED, *runfolder.RESUME_SAFE} - {"hparams"}
    changed = [f"{k}: {old.get(k)!r} → {v!r}" for k, v in new.items() if k not in skip and old.get(k) != v]
    if changed:
        raise ConfigError(
            f"resume: these settings differ from the run's ({saved_path}) and would break an exact resume: "
            f"{'; '.join(changed)} — resume with the run's own settings, or pass another --out"
        )


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
    `regression` loss) give ((s − rating)², s, rating)."""
    if loss_fn is None:
        from preftune.reward.losses import regression
        from preftune.reward.rated import rated_scores

        scores, ratings = rated_scores(model, part)
        return regression(scores, ratings), scores, ratings
    s_c, s_r = pair_scores(model, part)
    return loss_fn(s_c, s_r, pair_margins(part)), s_c, s_r


def _step(model: Any, params: list[torch.nn.Parameter], opt: Any, sched: Any, batch: list[Example],
          loss_fn: RMLoss | None, config: TrainConfig) -> dict[str, float]:  # fmt: skip
    """One optimizer step: Σ over micro-batches of Σ_examples loss / |batch| (the exact step mean).
    accuracy / margin: of s_c > s_r and s_c − s_r for pairs; of s > rating and s − rating for ratings."""
    micro = config.micro_batch_size or config.batch_size
    total = correct = margin = 0.0
    for start in range(0, len(batch), micro):
        part = batch[start : start + micro]
        losses, s_c, s_r = _batch_losses(model, part, loss_fn)
        (losses.sum() / len(batch)).backward()
        total += float(losses.detach().sum())
        correct += float((s_c > s_r).sum())
        margin += float((s_c - s_r).detach().sum())
    norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
    lr = float(sched.get_last_lr()[0])
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    n = len(batch)
    return {"loss": total / n, "accuracy": correct / n, "margin": margin / n, "grad_norm": norm, "lr": lr}


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
    model: Any, examples: list[Example], loss_fn: RMLoss, batch_size: int = 8, *, gaps: list | None = None
) -> dict[str, float]:
    """`pair_metrics` of `model` on `examples`."""
    s_c, s_r = all_pair_scores(model, examples, batch_size)
    return pair_metrics(s_c, s_r, examples, loss_fn, gaps)


def evaluate_held_out(
    model: Any, examples: list[Example], loss_fn: RMLoss | None, batch_size: int
) -> dict[str, float]:
    """Pairs: `evaluate_pairs`; rated responses (loss_fn None): `preftune.reward.rated.evaluate_rated`."""
    if loss_fn is None:
        from preftune.reward.rated import evaluate_rated

        return evaluate_rated(model, examples, batch_size)
    return evaluate_pairs(model, examples, loss_fn, batch_size)


def train_rm(config: TrainConfig, log: Any = print) -> Any:
    """Train a reward model: `config` as for `preftune train` (model, data, out, batch, optimizer,
    schedule, save_every, resume, eval_data) with method "rm" and `hparams["loss"]` a spec of
    `preftune.reward.losses` ("bt", "bt:1,center:0.01"; default "bt"). Returns the `RunResult`
    (final/ is the reward-model folder)."""
    loss = str(config.hparams.get("loss", "bt"))
    others = sorted(set(config.hparams) - {"loss", "ensemble", "aggregate"})
    if others:
        raise ConfigError(
            f"preftune train rm takes --loss (e.g. bt, 'bt:1,center:0.01'), --ensemble M and --aggregate, "
            f"not {', '.join(others)}"
        )
    loss_fn = None if loss == "regression" else parse_rm_loss(loss)  # regression: rating data
    _check(config)
    if "ensemble" in config.hparams or "aggregate" in config.hparams:
        from preftune.reward.ensemble_run import train_ensemble

        return train_ensemble(config, log)
    lock = _claim(config)
    try:
        return _train(config, loss_fn, loss, log)
    finally:
        lock.release()


def _train(config: TrainConfig, loss_fn: RMLoss | None, loss: str, log: Any) -> Any:
    from transformers.utils import logging as hf_logging

    from preftune.data.formatting import load_tokenizer
    from preftune.reward.rated import rated_examples
    from preftune.train.api import RunResult, seed_everything
    from preftune.train.logging import MetricsLogger
    from preftune.train.loop import batch_indices
    from preftune.train.optim import build_optimizer, build_scheduler
    from preftune.train.setup import phase_steps

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with the log
    seed_everything(config.seed)
    out = Path(config.out)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    load = rm_examples if loss_fn is not None else rated_examples
    examples = load(config.data, config, tokenizer, config.split)
    held_out = load(config.eval_data, config, tokenizer, config.eval_split) if config.eval_data else []
    if loss_fn is not None:
        check_margins(examples, loss_fn, config.data)
    total = phase_steps(config, [examples])[0]
    model = load_scorer(config.model, dtype=config.dtype)  # the new head draws from the seeded RNG
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config, total)
    start, last, last_good = _resume(config, model, optimizer, scheduler, total, log)
    logger = MetricsLogger(out, sinks=config.report_to, run_name=config.run_name or out.name,
                           config=config_to_dict(config))  # fmt: skip
    logger.truncate_after(start)
    what = "pairs" if loss_fn is not None else "rated responses"
    log(f"preftune train rm ({loss}): {len(examples)} {what}, {total} steps, batch {config.batch_size}")
    evals: dict[str, float] = {}
    for step in range(start, total):
        t0 = time.perf_counter()
        idx = batch_indices(len(examples), config.batch_size, seed=config.seed, phase=0, step=step)
        last = _step(model, params, optimizer, scheduler, [examples[i] for i in idx], loss_fn, config)
        last["seconds"] = time.perf_counter() - t0
        done = step + 1
        if done % config.log_every == 0 or done == total:
            logger.log({"step": done, "split": "train", **last})
            log(f"step {done}/{total}: loss {last['loss']:.4f}  accuracy {last['accuracy']:.3f}")
        if held_out and ((config.eval_every and done % config.eval_every == 0) or done == total):
            evals = evaluate_held_out(model, held_out, loss_fn, config.eval_batch_size or 8)
            logger.log({"step": done, "split": "eval", **evals})
        if (config.save_every and done % config.save_every == 0) or done == total:
            trainer_state = {"phase": 0, "step_in_phase": done, "total_steps": total, "metrics": last}
            last_good = ckpt.save_checkpoint(
                out / "checkpoints", done, model=model, optimizer=optimizer, scheduler=scheduler,
                trainer_state=trainer_state, loss_state={}, keep_last=config.keep_last,
            )  # fmt: skip
    logger.close()
    final = out / "final"
    model.save_pretrained(final)
    tokenizer.save_pretrained(final)
    summary = {"method": f"rm ({loss})", "steps": total, "train": last, "eval": evals,
               "checkpoint": str(last_good) if last_good else None}  # fmt: skip
    runfolder.write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    metrics = {**last, **{f"eval/{k}": v for k, v in evals.items()}}
    return RunResult(out, final, total, metrics)


def _resume(config: TrainConfig, model: Any, optimizer: Any, scheduler: Any, total: int,
            log: Any) -> tuple[int, dict[str, float], Path | None]:  # fmt: skip
    """(first step, last metrics, checkpoint) — from the checkpoint to resume, weights, optimizer,
    scheduler and RNG restored; (0, {}, None) to start afresh."""
    path = runfolder.resume_checkpoint(config)
    if path is None:
        return 0, {}, None
    state, _, _ = ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    ckpt.check_position(state, [total], path)
    _, _, step = runfolder.resume_position(state, total=total, config=config, path=path)
    log(f"resuming from step {step} of {total} ({path})")
    return step, dict(state.get("metrics", {})), path
