"""`train(config) -> RunResult` and `evaluate(...)`: the Python API behind `preftune train` / `preftune eval`.

A run is a list of *phases* (one, or Curry-DPO stages, or iterative rounds); each phase sets up its
reference (docs/algorithms.md §4), then runs optimizer steps (loop.py). Checkpoints record the next
position (phase, step in phase), so `--resume` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.config import TrainConfig, config_to_dict, validate
from preftune.errors import TrainingError
from preftune.train import checkpoint as ckpt
from preftune.train import faults, guards, runfolder
from preftune.train.batches import objective_kind
from preftune.train.distributed import (
    World,
    barrier,
    broadcast_params,
    init_world,
    main_first,
    main_only,
    shutdown,
)
from preftune.train.evaluation import evaluate
from preftune.train.logging import MetricsLogger, Progress, check_sinks, quiet_other_ranks
from preftune.train.loop import (
    Objective,
    batch_indices,
    evaluate_examples,
    gather_sums,
    objective_on_batch,
    reduce_gradients,
    sync_loss_state,
)
from preftune.train.optim import build_optimizer, build_scheduler
from preftune.train.setup import (
    build_phases,
    compute_dtype,
    extrapolate,
    load_examples,
    load_policy,
    phase_steps,
    save_final,
    setup_reference,
    trainable_state,
)
from preftune.train.signals import GracefulStop, stopped, stopped_at_once

__all__ = ["RunResult", "evaluate", "train"]


@dataclass
class RunResult:
    """What a finished run returns. metrics: the last train step's, plus `eval/*` of the final evaluation."""

    out_dir: Path
    final_dir: Path
    steps: int
    metrics: dict[str, float] = field(default_factory=dict)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)
    torch.use_deterministic_algorithms(True, warn_only=True)


def train(config: TrainConfig) -> RunResult:
    """Train `config.model` on `config.data` with `config.method`; write the run folder (see common layout)."""
    objective = Objective(validate(config), "")
    objective.kind = objective_kind(objective.terms)
    check_sinks(config.report_to)
    faults.check_inputs(config)  # before the run folder is made
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # per-file "Loading weights" bars would interleave with ours
    world = init_world()
    if not world.is_main:
        quiet_other_ranks()  # the data summaries and notices are rank 0's to print
    if config.fsdp and world.size > 1:  # one process has nothing to shard: it trains unsharded
        world = replace(world, fsdp=True)
    locks: list[runfolder.RunLock] = []
    try:
        # rank 0 locks and checks the run folder; an error there stops every rank
        main_only(world, lambda: locks.append(runfolder.claim(config, _say)))
        return _train(config, objective, world)
    finally:
        for lock in locks:
            lock.release()
        shutdown(world)


def _say(text: str) -> None:
    print(text, flush=True)


def _train(config: TrainConfig, objective: Objective, world: World) -> RunResult:
    from preftune.data.formatting import load_tokenizer

    out = Path(config.out)
    seed_everything(config.seed)
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    faults.check_vocab(tokenizer, config)

    def load_data() -> tuple[list[Any], list[Any], list[Any]]:
        examples = (
            load_examples(config.data, config, objective, tokenizer, split=config.split)
            if config.stages <= 1
            else []
        )
        eval_examples = (
            load_examples(config.eval_data, config, objective, tokenizer, split=config.eval_split)
            if config.eval_data
            else []
        )
        return examples, eval_examples, build_phases(config, examples, objective, tokenizer)

    # rank 0 tokenizes and fills the cache; the others read it (and see rank 0's data error, if any)
    examples, eval_examples, phases = main_first(world, load_data)
    steps = phase_steps(config, phases)
    total = sum(steps)
    micro = config.micro_batch_size or max(1, -(-config.batch_size // world.size))
    eval_micro = config.eval_batch_size or micro

    model = load_policy(config, world)
    broadcast_params(model, world)
    resume_path = ckpt.resume_point(world, lambda: runfolder.resume_checkpoint(config))
    if resume_path is not None:
        written_sharded = bool(ckpt.trainer_state(resume_path).get("fsdp", False))
        if written_sharded != world.fsdp:
            raise TrainingError(
                f"resume: {resume_path} was written "
                + (
                    "by a sharded run (fsdp under torchrun); resume it with fsdp=true under torchrun"
                    if written_sharded
                    else "by an unsharded run; resume it with fsdp=false"
                )
                + " (the optimizer state is stored differently)"
            )
    if world.fsdp:
        from preftune.models.sharding import shard_policy

        if resume_path is not None:
            ckpt.load_weights(model, resume_path)  # whole weights into the whole model, then shard
        model = shard_policy(
            model, device=world.device, world_size=world.size, compute_dtype=compute_dtype(config)
        )
    model.train()
    autocast = None if world.fsdp else compute_dtype(config)  # FSDP casts through its own policy
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer(params, config)
    scheduler = build_scheduler(optimizer, config, total)

    phase, step_in_phase, global_step = 0, 0, 0
    last: dict[str, float] = {}
    loss_state: dict[str, dict[str, torch.Tensor]] = {}
    resume_state: dict[str, Any] | None = None
    extra: dict[str, dict[str, torch.Tensor]] = {}
    last_good: Path | None = None
    if resume_path is not None:
        path = resume_path
        resume_state, loss_state, extra = ckpt.load_checkpoint(
            path,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            weights=not world.fsdp,
            load_optimizer=_fsdp_optimizer_loader(model, optimizer) if world.fsdp else None,
        )
        ckpt.check_position(resume_state, steps, path)
        phase, step_in_phase, global_step = runfolder.resume_position(
            resume_state, total=total, config=config, path=path
        )
        last_good = path
        last = dict(resume_state.get("metrics", {}))
        if world.is_main:
            runfolder.accept_resume(config, resume_state, path, total, _say)

    logger = MetricsLogger(
        out,
        sinks=config.report_to,
        run_name=config.run_name or out.name,
        config=config_to_dict(config, objective.terms),
        enabled=world.is_main,
    )
    repaired = logger.truncate_after(global_step)
    progress = Progress(
        total, enabled=world.is_main, live=config.progress, log_every=config.log_every, start=global_step
    )
    log = progress.print if world.is_main else (lambda _msg: None)
    if repaired:
        log(repaired)
    log(
        f"preftune train {config.method}: {'+'.join(str(len(p)) for p in phases)} examples, {total} steps over {len(phases)} "
        f"phase(s), batch {config.batch_size} = {world.size} process(es) × micro-batches of {micro}"
        + (", sharded (fsdp)" if world.fsdp else "")
        + (" (fsdp: one process, nothing to shard)" if config.fsdp and not world.fsdp else "")
    )
    eval_metrics: dict[str, float] = {}
    apo_prev: dict[str, torch.Tensor] | None = None
    graceful = GracefulStop()
    try:
        graceful.__enter__()  # signals now stop the run at a step boundary, after a checkpoint
        while phase < len(phases):
            data = phases[phase]
            mid = resume_state is not None and step_in_phase > 0
            ref = setup_reference(
                config,
                objective,
                model,
                phase,
                [data, eval_examples],
                world,
                log=log,
                resume_state=resume_state if mid else None,
                resume_weights=extra.get("reference") if mid else None,
                steps=range(step_in_phase, steps[phase]),
            )
            if config.apo_alpha and apo_prev is None:
                # θ̂_t of Accelerated PO: the previous round's *un-extrapolated* result (θ̂_0 = θ_0)
                apo_prev = extra["apo_prev"] if "apo_prev" in extra else trainable_state(model)
                if world.fsdp and "apo_prev" in extra:  # saved whole: shard it like the parameters
                    from preftune.models.sharding import shard_like

                    apo_prev = shard_like(apo_prev, model)
            resume_state = None
            while step_in_phase < steps[phase]:
                t0 = time.perf_counter()
                idx = batch_indices(
                    len(data), config.batch_size, seed=config.seed, phase=phase, step=step_in_phase
                )
                batch = [data[i] for i in idx]
                state_before = {k: dict(v) for k, v in loss_state.items()}
                sums = objective_on_batch(
                    model,
                    batch,
                    objective=objective,
                    reference=ref.provider,
                    loss_state=loss_state,
                    world=world,
                    micro_batch_size=micro,
                    backward=True,
                    autocast=autocast,
                )
                metrics = gather_sums(sums, world)
                grad_norm = reduce_gradients(params, world, config.max_grad_norm)
                lr = float(scheduler.get_last_lr()[0])
                finite = np.isfinite(metrics["loss"]) and np.isfinite(grad_norm)
                if not finite and config.on_nonfinite == "error":
                    raise guards.nonfinite_step(global_step + 1, metrics["loss"], grad_norm, last_good)
                if finite:
                    optimizer.step()
                    scheduler.step()
                else:
                    log(f"step {global_step + 1}: non-finite loss/gradient, step skipped (on_nonfinite=skip)")
                    loss_state.clear()  # a NaN must not enter running loss state (BCO's δ) either
                    loss_state.update(state_before)
                optimizer.zero_grad(set_to_none=True)
                sync_loss_state(loss_state, world)
                global_step += 1
                step_in_phase += 1
                if config.ref_sync_every and global_step % config.ref_sync_every == 0:
                    ref.provider.sync(model, config.ref_sync_alpha)
                seconds = max(time.perf_counter() - t0, 1e-9)
                last = {
                    **{k: v for k, v in metrics.items() if k not in ("tokens", "examples")},
                    "grad_norm": grad_norm,
                    "lr": lr,
                    "tokens_per_s": metrics["tokens"] / seconds,
                    "examples_per_s": metrics["examples"] / seconds,
                    "skipped": float(not finite),
                }
                if global_step % config.log_every == 0 or step_in_phase == steps[phase]:
                    logger.log({"step": global_step, "split": "train", "phase": phase, **last})
                progress.update(global_step, last)
                phase_done = step_in_phase == steps[phase]
                if phase_done and apo_prev is not None:
                    hat = trainable_state(model)
                    extrapolate(model, apo_prev, config.apo_alpha)  # θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t)
                    apo_prev = hat
                if not guards.weights_finite(params, world):  # before anything is evaluated or saved
                    raise guards.nonfinite_weights(global_step, last, last_good, config.on_nonfinite)
                if eval_examples and (
                    (config.eval_every and global_step % config.eval_every == 0)
                    or (phase_done and phase == len(phases) - 1)
                ):
                    eval_metrics = _evaluate(
                        model,
                        eval_examples,
                        objective,
                        ref.provider,
                        loss_state,
                        world,
                        eval_micro,
                        global_step,
                        logger,
                        autocast,
                    )
                signum = graceful.requested(world)
                if (
                    (config.save_every and global_step % config.save_every == 0)
                    or global_step == total
                    or signum
                ):
                    position = (phase + 1, 0) if phase_done else (phase, step_in_phase)
                    last_good = _save(
                        out,
                        global_step,
                        total,
                        position,
                        model,
                        optimizer,
                        scheduler,
                        loss_state,
                        config,
                        ref,
                        apo_prev,
                        world,
                        last,
                    )
                if signum:
                    raise stopped(signum, global_step, total, last_good, config.out, world)
            phase += 1
            step_in_phase = 0
    except (RuntimeError, MemoryError) as err:
        if not faults.is_out_of_memory(err):
            raise
        raise faults.out_of_memory(
            err, config=config, done=global_step, micro=micro, last_good=last_good
        ) from None
    except KeyboardInterrupt:  # a second signal (or Ctrl-C where no handler could be installed)
        newest = ckpt.list_checkpoints(out / "checkpoints")  # a save may have ended mid-prune
        raise stopped_at_once(global_step, newest[-1] if newest else None, config.out, world) from None
    finally:
        graceful.__exit__(None, None, None)
        progress.close()
        logger.close()
    final = out / "final"
    if world.fsdp:
        from preftune.models.sharding import full_state_dict

        # a collective: every rank takes part; a LoRA run gathers its adapter only (peft keeps that)
        lora = (lambda name: "lora_" in name) if hasattr(model.lm, "peft_config") else None
        whole = full_state_dict(model, keep=world.is_main, only=lora)
        if world.is_main:
            save_final(model.lm, tokenizer, final, state_dict=whole, config=config)
    elif world.is_main:
        save_final(model, tokenizer, final, config=config)
    if world.is_main:
        eval_metrics = runfolder.finish(
            config,
            steps=global_step,
            train_metrics=last,
            eval_metrics=eval_metrics,
            checkpoint=last_good,
            log=log,
        )
    barrier(world)
    return RunResult(out, final, global_step, {**last, **{f"eval/{k}": v for k, v in eval_metrics.items()}})


def _evaluate(
    model: Any,
    examples: list[Any],
    objective: Objective,
    reference: Any,
    loss_state: dict[str, dict[str, torch.Tensor]],
    world: World,
    batch_size: int,
    step: int,
    logger: MetricsLogger,
    autocast: torch.dtype | None,
) -> dict[str, float]:
    metrics = evaluate_examples(
        model,
        examples,
        objective=objective,
        reference=reference,
        loss_state=loss_state,
        world=world,
        batch_size=batch_size,
        autocast=autocast,
    )
    metrics = {k: v for k, v in metrics.items() if k not in ("tokens",)}
    logger.log({"step": step, "split": "eval", **metrics})
    return metrics


def _save(
    out: Path,
    step: int,
    total: int,
    position: tuple[int, int],
    model: Any,
    optimizer: Any,
    scheduler: Any,
    loss_state: dict[str, dict[str, torch.Tensor]],
    config: TrainConfig,
    ref: Any,
    apo_prev: dict[str, torch.Tensor] | None,
    world: World,
    metrics: dict[str, float],
) -> Path:
    extra: dict[str, dict[str, torch.Tensor]] = {}
    moving = ref.moving_weights(position[0], config, keep=world.is_main)
    if moving is not None:
        extra["reference"] = moving
    if apo_prev is not None:
        if world.fsdp:  # whole tensors, gathered by every rank in step
            from preftune.models.sharding import full_tensor

            apo_prev = {k: full_tensor(v) for k, v in apo_prev.items()}
        extra["apo_prev"] = apo_prev
    path = out / "checkpoints" / f"step-{step}"
    weights = optimizer_state = None
    if world.fsdp:  # gather whole tensors first: collectives, so every rank takes part
        from preftune.models.sharding import checkpoint_weights, full_optimizer_state

        weights = checkpoint_weights(model, keep=world.is_main)
        optimizer_state = full_optimizer_state(model, optimizer)

    def write() -> None:
        state = {
            "phase": position[0],
            "step_in_phase": position[1],
            "total_steps": total,
            "reference_fingerprint": ref.fingerprint,
            "metrics": metrics,
            "fsdp": world.fsdp,
        }
        ckpt.save_checkpoint(
            out / "checkpoints",
            step,
            model=model.lm if world.fsdp else model,
            optimizer=optimizer,
            scheduler=scheduler,
            trainer_state=state,
            loss_state=loss_state,
            keep_last=config.keep_last,
            extra=extra,
            weights=weights,
            optimizer_state=optimizer_state,
        )

    main_only(world, write)  # rank 0 writes; its error (a full disk) stops every rank
    return path


def _fsdp_optimizer_loader(model: Any, optimizer: Any) -> Any:
    """Load a checkpoint's optimizer state into the sharded optimizer (each rank keeps its shard)."""
    from preftune.models.sharding import load_full_optimizer_state

    return lambda state: load_full_optimizer_state(model, optimizer, state)
