"""The training loop `preftune train rm` and `preftune train prm` share: run folder, steps, checkpoints.

    result = run_scorer(config, load, log, "rm (bt)")   # load(tokenizer) → ScorerTask (data, step, header)

A scorer (a sequence classifier with one output) trains in a small loop of its own, built from the
training parts: the run folder's lock and resume rules (`train/runfolder.py`), checkpoints
(`train/checkpoint.py`), the optimizer and scheduler builders, and the seeded batches of
`batch_indices`, so a resumed run takes the same steps as an unbroken one. What differs between an
outcome and a process reward model (the data, one optimizer step's loss, a held-out evaluation, the
files beside the weights) comes in a `ScorerTask`.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.config import FIELDS, TrainConfig, config_to_dict
from preftune.errors import ConfigError
from preftune.train import checkpoint as ckpt
from preftune.train import runfolder

StepFn = Callable[[Any, list[torch.nn.Parameter], Any, Any, list[Any]], dict[str, float]]
"""step(model, params, optimizer, scheduler, batch) → the step's metrics (it takes the optimizer step)."""


def check_config(config: TrainConfig) -> None:
    """model, data and out given; no LoRA / FSDP / stages / rounds (one process, one phase)."""
    for name in ("model", "data", "out"):
        if not getattr(config, name):
            raise ConfigError(f"'{name}' is required for preftune train rm (--{name})")
    from preftune.paths import is_pipeline_folder
    from preftune.train.faults import check_inputs

    check_inputs(config)  # data and model found, the model folder a model
    if is_pipeline_folder(config.model):
        raise ConfigError(
            f"--model {config.model} is a diffusers pipeline folder: preftune train rm / prm train a "
            "language model into a reward model (a sequence classifier); a diffusion run takes an image "
            "reward by name, --reward (docs/diffusion.md)"
        )
    if config.lora or config.fsdp or config.stages > 1 or config.rounds > 1:
        raise ConfigError(
            "preftune train rm trains the whole model in one process and one phase: remove "
            "lora / fsdp / stages / rounds"
        )


def claim(config: TrainConfig) -> runfolder.RunLock:
    """Lock OUT; refuse to overwrite a run; on --resume, refuse settings that differ from config.yaml."""
    out = Path(config.out)
    lock = runfolder.lock_folder(out)  # a failed run's `with lock:` puts the folder back (RunLock.undo)
    try:
        saved = out / "config.yaml"
        if config.resume:
            for path in runfolder.resume_configs(out, config.resume):
                _check_same(config, path)
        if not config.resume and runfolder.has_run(out):
            raise ConfigError(
                f"run folder {out} already has a run — pass --resume to continue it, or another --out"
            )
        import yaml

        runfolder.write_atomic(
            saved, yaml.safe_dump(config_to_dict(config), sort_keys=False, allow_unicode=True)
        )
    except BaseException:
        lock.undo()
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


def resume(config: TrainConfig, model: Any, optimizer: Any, scheduler: Any, total: int,
           log: Any, digest: str = "") -> tuple[int, dict[str, float], Path | None]:  # fmt: skip
    """(first step, last metrics, checkpoint) — from the checkpoint to resume, weights, optimizer,
    scheduler and RNG restored; (0, {}, None) to start afresh. `digest`: the training data's
    (`digests.rows_digest`), refused when the checkpoint records another."""
    path = runfolder.resume_checkpoint(config)
    if path is None:
        return 0, {}, None
    state, _, _ = ckpt.load_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler)
    ckpt.check_position(state, [total], path)
    runfolder.check_resume_data(config, state, digest, path)
    _, _, step = runfolder.resume_position(state, total=total, config=config, path=path)
    log(f"resuming from step {step} of {total} ({path})")
    return step, dict(state.get("metrics", {})), path


def optimizer_step(
    params: list[torch.nn.Parameter], opt: Any, sched: Any, config: TrainConfig
) -> tuple[float, float]:
    """Clip the accumulated gradients, step the optimizer and scheduler, clear the gradients:
    (the gradient norm before clipping, the learning rate the step used)."""
    norm = float(torch.nn.utils.clip_grad_norm_(params, config.max_grad_norm or float("inf")))
    lr = float(sched.get_last_lr()[0])
    opt.step()
    sched.step()
    opt.zero_grad(set_to_none=True)
    return norm, lr


def pair_step(
    batch: list[Any],
    part_losses: Callable[[list[Any]], tuple[torch.Tensor, torch.Tensor, torch.Tensor]],
    params: list[torch.nn.Parameter],
    opt: Any,
    sched: Any,
    config: TrainConfig,
) -> dict[str, float]:
    """One optimizer step over `batch` in micro-batches: Σ_micro Σ_examples loss / |batch| (the exact
    step mean). `part_losses(micro)` → (per-example losses, right [0/1], margin) of one micro-batch;
    the step's metrics are their means, with the gradient norm and learning rate."""
    micro = config.micro_batch_size or config.batch_size
    total = correct = margin = 0.0
    for start in range(0, len(batch), micro):
        losses, right, gap = part_losses(batch[start : start + micro])
        (losses.sum() / len(batch)).backward()
        total += float(losses.detach().sum())
        correct += float(right.sum())
        margin += float(gap.detach().sum())
    norm, lr = optimizer_step(params, opt, sched, config)
    n = len(batch)
    return {"loss": total / n, "accuracy": correct / n, "margin": margin / n, "grad_norm": norm, "lr": lr}


@dataclass
class ScorerTask:
    """What one kind of scorer brings to `run_scorer`.

    header:  the first log line's start, e.g. "preftune train rm (bt): 600 pairs" (steps and batch
             size are appended).
    data:    the training examples; each step's batch is `batch_indices` of them.
    step:    one optimizer step on a batch (`StepFn`).
    shown:   a metric printed after the loss on each log line (e.g. "accuracy").
    evaluate: held-out metrics of the model, logged as split "eval" every `eval_every` steps and at
             the end (None: no held-out data).
    sorted_batches: hand the batch's examples over in data order (a prompt's solutions adjacent).
    files:   extra files written into OUT/final/ (name → text).
    complete: completes OUT/final/ after the weights, tokenizer and files (the implicit RM's
             reference copy), or None.
    num_labels: the scorer's outputs (M > 1: M heads on one trunk, `preftune train rm --heads M`).
    model:   the model to train, built by the task (the implicit RM's causal LM); None: a scalar-head
             scorer from `config.model` (`load_scorer`).
    """

    header: str
    data: Sequence[Any]
    step: StepFn
    shown: str | None = None
    evaluate: Callable[[Any], dict[str, float]] | None = None
    sorted_batches: bool = False
    files: dict[str, str] = field(default_factory=dict)
    num_labels: int = 1
    model: Any = None
    complete: Callable[[Path], None] | None = None


@dataclass
class ScorerOutcome:
    """What a finished loop leaves: total steps, the last train metrics, the last evaluation, the last
    checkpoint written (None when none was) and the OUT/final folder."""

    total: int
    last: dict[str, float]
    evals: dict[str, float]
    checkpoint: Path | None
    final: Path


def run_scorer(config: TrainConfig, load: Callable[[Any], ScorerTask], log: Any, method: str) -> Any:
    """Seed, load the tokenizer and `load(tokenizer)`'s task, build the scorer (its new head drawn from
    the seeded RNG), optimizer and schedule, resume if asked, run the steps with logging, evaluation
    and checkpoints, save OUT/final/ (weights, tokenizer, the task's files) and finish the run as
    `method` (`finish_scorer`); a stop signal while it writes them says what is saved. The RunResult."""
    from transformers.utils import logging as hf_logging

    from preftune.data.formatting import load_tokenizer
    from preftune.reward.scoring import load_scorer
    from preftune.train.api import seed_everything
    from preftune.train.digests import rows_digest
    from preftune.train.logging import MetricsLogger
    from preftune.train.loop import batch_indices
    from preftune.train.optim import build_optimizer, build_scheduler
    from preftune.train.setup import phase_steps
    from preftune.train.signals import Finishing, StepStops

    hf_logging.disable_progress_bar()  # "Writing model shards" bars would interleave with the log
    seed_everything(config.seed)
    out = Path(config.out)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    task = load(tokenizer)
    total = phase_steps(config, [task.data])[0]
    model = task.model
    if model is None:
        model = load_scorer(config.model, dtype=config.dtype, num_labels=task.num_labels)
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config, total)
    digest = rows_digest(task.data)  # each checkpoint records it: a resume refuses other data
    start, last, last_good = resume(config, model, optimizer, scheduler, total, log, digest)
    logger = MetricsLogger(out, sinks=config.report_to, run_name=config.run_name or out.name,
                           config=config_to_dict(config))  # fmt: skip
    logger.truncate_after(start)
    log(f"{task.header}, {total} steps, batch {config.batch_size}")
    if config.lr == FIELDS["lr"].default:
        log(f"note: lr {config.lr:g} is the preference losses' default; reward models usually train at "
            "1e-5 to 1e-4 (TRL's RewardConfig: 1e-4) — pass --lr")  # fmt: skip
    evals: dict[str, float] = {}

    def save(done: int) -> Path:
        state = {"phase": 0, "step_in_phase": done, "total_steps": total, "metrics": last,
                 "data_digest": digest}  # fmt: skip
        return ckpt.save_checkpoint(
            out / "checkpoints", done, model=model, optimizer=optimizer, scheduler=scheduler,
            trainer_state=state, loss_state={}, keep_last=config.keep_last,
        )  # fmt: skip

    with StepStops(str(out), total) as stops:  # a signal: checkpoint at the step's end, then stop
        for step in range(start, total):
            t0 = time.perf_counter()
            idx = batch_indices(len(task.data), config.batch_size, seed=config.seed, phase=0, step=step)
            if task.sorted_batches:
                idx = sorted(idx)
            last = task.step(model, params, optimizer, scheduler, [task.data[i] for i in idx])
            last["seconds"] = time.perf_counter() - t0
            done, saved = step + 1, None
            if done % config.log_every == 0 or done == total:
                logger.log({"step": done, "split": "train", **last})
                shown = f"  {task.shown} {last[task.shown]:.3f}" if task.shown else ""
                log(f"step {done}/{total}: loss {last['loss']:.4f}{shown}")
            if task.evaluate and ((config.eval_every and done % config.eval_every == 0) or done == total):
                evals = task.evaluate(model)
                logger.log({"step": done, "split": "eval", **evals})
            if (config.save_every and done % config.save_every == 0) or done == total:
                last_good = saved = save(done)
            stops.check(done, saved, lambda d=done: save(d))
    logger.close()
    outcome = ScorerOutcome(total, last, evals, last_good, out / "final")
    with Finishing(str(out), total, total) as finishing:  # a signal: say what is saved
        write_final(outcome.final, model, tokenizer, task)
        finishing.wrote("final/")
        return finish_scorer(config, outcome, method, log, finishing.wrote)


def write_final(final: Path, model: Any, tokenizer: Any, task: ScorerTask) -> None:
    """OUT/final/: the weights, the tokenizer, the task's files and what `task.complete` adds, written
    as final.tmp/ and renamed, so that final/ is whole or not there (or the previous one)."""
    import shutil

    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        for name, text in task.files.items():
            runfolder.write_atomic(tmp / name, text)
        if task.complete is not None:
            task.complete(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)


def finish_scorer(
    config: TrainConfig, run: ScorerOutcome, method: str, log: Any, wrote: Callable[[str], None]
) -> Any:
    """OUT/summary.json (then `wrote("summary.json")`) and (unless `report` is off) OUT/report.html of
    a finished scorer run, as every other `preftune train` run leaves them; the RunResult."""
    import json

    from preftune.train.api import RunResult

    out = Path(config.out)
    summary = {"method": method, "steps": run.total, "train": run.last, "eval": run.evals,
               "checkpoint": str(run.checkpoint) if run.checkpoint else None}  # fmt: skip
    runfolder.write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    wrote("summary.json")
    if config.report:
        runfolder.write_run_report(out, log)
    metrics = {**run.last, **{f"eval/{k}": v for k, v in run.evals.items()}}
    return RunResult(out, run.final, run.total, metrics)
