"""`train(config) -> RunResult` and `evaluate(...)`: the Python API behind `preftune train` / `preftune eval`.

A run is a list of *phases* (one, or Curry-DPO stages, or iterative rounds), each a source of the
examples of its steps (`train/run.py`); each phase sets up its reference (docs/algorithms.md §4),
then runs optimizer steps. Checkpoints record the next position (phase, step in phase), so
`--resume` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import os
import random
import shutil
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.config import TrainConfig, config_to_dict, validate
from preftune.errors import TrainingError
from preftune.method_checks import check_model_kind
from preftune.online_methods import is_online
from preftune.paths import is_pipeline_folder
from preftune.rl.phase import OnlinePhase, held_out_prompts, online_phase
from preftune.train import checkpoint as ckpt
from preftune.train import faults, runfolder
from preftune.train.allocator import apply_mmap_threshold
from preftune.train.batches import objective_kind, prompt_groups
from preftune.train.digests import data_digest, image_rows_digest
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
from preftune.train.loop import Objective
from preftune.train.optim import build_optimizer, build_scheduler
from preftune.train.run import OfflinePhase, PhaseSource, Run, RunState, hold_grads
from preftune.train.setup import (
    build_phases,
    compute_dtype,
    load_examples,
    load_policy,
    phase_steps,
    save_final,
)
from preftune.train.signals import Finishing, GracefulStop, stopped_at_once

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
    deterministic_algorithms()


def deterministic_algorithms() -> None:
    """`torch.use_deterministic_algorithms(True, warn_only=True)` without the import that function makes
    of `torch._inductor.config` to set the compiler's own flag: ~800 modules (sympy, mpmath) and
    ~70 MiB of resident memory for a compiler preftune never runs. The dispatcher flag the eager ops
    read is set the same way; Inductor's flag is set too when something already loaded Inductor.

    `torch.utils.deterministic.fill_uninitialized_memory` is turned off: in deterministic mode torch
    otherwise writes NaN into every new `torch.empty` buffer (a debugging aid against kernels that
    read memory they never wrote) — ~3 ms per 16 MiB buffer, about a tenth of a DPO step's CPU time
    in `benchmarks/profile_step.py`. Results of correct kernels do not depend on it."""
    torch._C._set_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # type: ignore[attr-defined]
    inductor: Any = sys.modules.get("torch._inductor.config")
    if inductor is not None:
        inductor.deterministic = True


def train(config: TrainConfig) -> RunResult:
    """Train `config.model` on `config.data` with `config.method`; write the run folder (see common layout)."""
    if is_pipeline_folder(config.model):  # a diffusers pipeline: β in the papers' units
        from preftune.diffusion.train import with_paper_defaults

        config = with_paper_defaults(config)
    objective = Objective(validate(config), "")
    check_model_kind(config, objective.terms, is_pipeline_folder(config.model))
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
    except BaseException as err:
        for lock in locks:  # failed before recording anything: the folder as it was (RunLock.undo)
            lock.undo()
        full = faults.disk_full(err, Path(config.out))
        if full is not None:
            raise full from None
        raise
    finally:
        for lock in locks:
            lock.release()
        shutdown(world)


def _say(text: str) -> None:
    print(text, flush=True)


def _train(config: TrainConfig, objective: Objective, world: World) -> RunResult:
    """Set up, then the loop: each phase's source yields a batch per step; `Run` steps and checkpoints."""
    apply_mmap_threshold(config.malloc_mmap_threshold_mib)
    seed_everything(config.seed)
    tokenizer, sources, eval_examples = _load_data(config, objective, world)
    total = sum(s.steps for s in sources)
    digests = {"data_digest": data_digest(sources), "image_rows": image_rows_digest(sources)}
    state = _initial_state(config, world, [s.steps for s in sources], digests)
    if objective.kind == "distill":
        from preftune.train.distill_step import load_teachers

        objective.teachers = load_teachers(config, world)
    for source in sources:  # sources that sample with the policy (online; seppo / pso losers)
        attach = getattr(source, "attach", None)
        if attach is not None:
            attach(state.model)
            sampler = getattr(source, "sampler", None)
            state.sampler = sampler  # its state is checkpointed; restored here on resume
            if sampler is not None:
                sampler.load_state_dict(state.extra.get("sampler", {}))
    run = _make_run(config, objective, world, sources, eval_examples, total, state)
    run.data_digest, run.image_rows = digests["data_digest"], digests["image_rows"]
    graceful = GracefulStop()
    try:
        graceful.__enter__()  # signals now stop the run at a step boundary, after a checkpoint
        for source in sources[state.phase :]:
            ref = run.begin_phase(state, source)
            if hasattr(source, "attach_reference"):
                source.attach_reference(ref.provider)  # XPO and seppo sample from it
            while state.step_in_phase < source.steps:
                batch = source.batch(state.step_in_phase)
                t0 = time.perf_counter()
                run.step(state, batch, ref, keep_grads=isinstance(source, OfflinePhase))
                if isinstance(source, OnlinePhase):  # rollout metrics; sampling vs training time
                    state.last.update(source.metrics, train_s=time.perf_counter() - t0)
                elif hasattr(source, "metrics"):  # seppo: which snapshot was the reference
                    state.last.update(source.metrics)
                run.after_step(state, source, ref, graceful)
            state.phase += 1
            state.step_in_phase = 0
    except (RuntimeError, MemoryError) as err:
        if not faults.is_out_of_memory(err):
            raise
        raise faults.out_of_memory(
            err, config=config, done=state.global_step, micro=run.micro, last_good=state.last_good
        ) from None
    except KeyboardInterrupt:  # a second signal (or Ctrl-C where no handler could be installed)
        newest = ckpt.list_checkpoints(Path(config.out) / "checkpoints")  # a save may have ended mid-prune
        raise stopped_at_once(state.global_step, newest[-1] if newest else None, config.out, world) from None
    finally:
        graceful.__exit__(None, None, None)
        run.progress.close()
        run.logger.close()
    with Finishing(config.out, state.global_step, total, world) as finishing:  # a signal: say what is saved
        return _finish(config, world, state, tokenizer, run.log, finishing)


def _load_data(
    config: TrainConfig, objective: Objective, world: World
) -> tuple[Any, list[PhaseSource], list[Any]]:
    """The tokenizer, each phase's source and the held-out examples (rank 0 tokenizes and fills the
    cache; the others read it, and see rank 0's data error, if any)."""
    from preftune.data.formatting import load_tokenizer
    from preftune.paths import is_pipeline_folder

    if is_pipeline_folder(config.model):  # image pairs: latents and text embeddings, no tokenizer
        from preftune.diffusion.phase import diffusion_sources

        log = _say if world.is_main else (lambda _msg: None)
        images, held = main_first(world, lambda: diffusion_sources(config, objective, log))
        return None, list[PhaseSource](images), held
    tokenizer = load_tokenizer(config.tokenizer or config.model)
    faults.check_vocab(tokenizer, config)
    faults.check_teachers(tokenizer, config)
    if is_online(config.method):  # the policy's own samples: groups, or what a builder makes of them
        phase = main_first(world, lambda: online_phase(config, tokenizer))
        return tokenizer, [phase], held_out_prompts(config, tokenizer)

    def load() -> tuple[list[Any], list[Any]]:
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
        return build_phases(config, examples, objective, tokenizer), eval_examples

    phases, eval_examples = main_first(world, load)
    sources: list[PhaseSource] = [
        OfflinePhase(
            i,
            data,
            n,
            config.batch_size,
            config.seed,
            prompt_groups(data) if config.group_by_prompt else None,
        )
        for i, (data, n) in enumerate(zip(phases, phase_steps(config, phases)))
    ]
    return tokenizer, sources, eval_examples


def _initial_state(config: TrainConfig, world: World, steps: list[int], digests: dict[str, str]) -> RunState:
    """The policy (sharded under FSDP), its optimizer and scheduler, restored from the checkpoint to
    resume when there is one (trained on data of these `digests`: `data_digest`, `image_rows`)."""
    model = load_policy(config, world)
    if _value_head(config):  # PPO family: the critic's head on the policy trunk, before the optimizer
        from preftune.rl.ppo import attach_value_head

        attach_value_head(model)
    broadcast_params(model, world)
    resume_path = ckpt.resume_point(world, lambda: runfolder.resume_checkpoint(config))
    if resume_path is not None:
        _check_sharding(resume_path, world)
    if world.fsdp:
        from preftune.models.sharding import shard_policy

        if resume_path is not None:
            ckpt.load_weights(model, resume_path)  # whole weights into the whole model, then shard
        model = shard_policy(
            model, device=world.device, world_size=world.size, compute_dtype=compute_dtype(config)
        )
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = _value_head_group(model, params, config) or build_optimizer(params, config)
    state = RunState(model, params, optimizer, build_scheduler(optimizer, config, sum(steps)))
    if resume_path is not None:
        _restore(state, resume_path, config, world, steps, digests)
    return state


def _value_head(config: TrainConfig) -> bool:
    from preftune.online_methods import expand, is_online

    return is_online(config.method) and expand(config.method, config.estimator, config.objective)[0] == "gae"


def _value_head_group(model: Any, params: list[Any], config: TrainConfig) -> Any:
    """The optimizer of a policy with a value head: the head in a param group of its own, at
    `value_lr` (default: lr); None without a head."""
    from preftune.rl.ppo import value_head

    head = value_head(model)
    if head is None:
        return None
    own = {id(p) for p in head.parameters()}
    optimizer = build_optimizer([p for p in params if id(p) not in own], config)
    optimizer.add_param_group({"params": list(head.parameters()), "lr": config.value_lr or config.lr})
    return optimizer


def _check_sharding(resume_path: Path, world: World) -> None:
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


def _restore(
    state: RunState, path: Path, config: TrainConfig, world: World, steps: list[int], digests: dict[str, str]
) -> None:
    """Weights, optimizer, scheduler, RNG, loss state and position from the checkpoint `path`;
    `steps`: the phases' step counts, `digests`: the data's (`run.data_digest`, `run.image_rows`)."""
    total = sum(steps)
    resume, state.loss_state, state.extra = ckpt.load_checkpoint(
        path,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        weights=not world.fsdp,
        load_optimizer=_fsdp_optimizer_loader(state.model, state.optimizer) if world.fsdp else None,
    )
    ckpt.check_position(resume, steps, path)
    runfolder.check_resume_data(config, resume, digests["data_digest"], path)
    runfolder.check_resume_images(config, resume, digests["image_rows"], path)
    hold_grads(state.params, resume.get("grads_held"), path)
    state.phase, state.step_in_phase, state.global_step = runfolder.resume_position(
        resume, total=total, config=config, path=path
    )
    state.resume = resume
    state.last_good = path
    state.last = dict(resume.get("metrics", {}))
    if world.is_main:
        runfolder.accept_resume(config, resume, path, total, _say)


def _make_run(
    config: TrainConfig,
    objective: Objective,
    world: World,
    sources: list[PhaseSource],
    eval_examples: list[Any],
    total: int,
    state: RunState,
) -> Run:
    """The run's fixed parts: batch geometry, the metrics log (repaired past the resume point), the
    progress display and the start line."""
    out = Path(config.out)
    micro = config.micro_batch_size or max(1, -(-config.batch_size // world.size))
    logger = MetricsLogger(
        out,
        sinks=config.report_to,
        run_name=config.run_name or out.name,
        config=config_to_dict(config, objective.terms),
        enabled=world.is_main,
    )
    repaired = logger.truncate_after(state.global_step)
    progress = Progress(
        total,
        enabled=world.is_main,
        live=config.progress,
        log_every=config.log_every,
        start=state.global_step,
    )
    log = progress.print if world.is_main else (lambda _msg: None)
    if repaired:
        log(repaired)
    online = any(isinstance(s, OnlinePhase) for s in sources)
    sizes = "+".join(
        f"{len(s.prompts)} prompts × {s.num_generations} samples"
        if isinstance(s, OnlinePhase)
        else str(len(s.examples))
        for s in sources
    )
    log(
        f"preftune train {config.method}: {sizes}{'' if online else ' examples'}, {total} steps "
        f"over {len(sources)} phase(s), batch {config.batch_size} = {world.size} process(es) × micro-batches "
        f"of {micro}"
        + (", sharded (fsdp)" if world.fsdp else "")
        + (" (fsdp: one process, nothing to shard)" if config.fsdp and not world.fsdp else "")
    )
    autocast = None if world.fsdp else compute_dtype(config)  # FSDP casts through its own policy
    return Run(
        config, objective, world, out, eval_examples, micro, config.eval_batch_size or micro, autocast,
        total, len(sources), logger, progress, log,
    )  # fmt: skip


def _finish(
    config: TrainConfig, world: World, state: RunState, tokenizer: Any, log: Any, finishing: Finishing
) -> RunResult:
    """Save OUT/final/ (gathered whole under FSDP), write summary.json and the report."""
    out = Path(config.out)
    final = out / "final"
    _save_final(config, world, state, tokenizer, final)
    finishing.wrote("final/")
    eval_metrics = state.eval_metrics
    if world.is_main:
        eval_metrics = runfolder.finish(
            config,
            steps=state.global_step,
            train_metrics=state.last,
            eval_metrics=eval_metrics,
            checkpoint=state.last_good,
            log=log,
            wrote=finishing.wrote,
        )
    barrier(world)
    metrics = {**state.last, **{f"eval/{k}": v for k, v in eval_metrics.items()}}
    return RunResult(out, final, state.global_step, metrics)


def _save_final(config: TrainConfig, world: World, state: RunState, tokenizer: Any, final: Path) -> None:
    """OUT/final/, written as final.tmp/ and renamed: a write that fails removes final.tmp/ (a full
    disk is an OSError naming final/, which `train` turns into one line)."""
    model = state.model
    try:
        if world.fsdp:
            from preftune.models.sharding import full_state_dict

            # a collective: every rank takes part; a LoRA run gathers its adapter only (peft keeps that)
            lora = (lambda name: "lora_" in name) if hasattr(model.lm, "peft_config") else None
            whole = full_state_dict(model, keep=world.is_main, only=lora)
            if world.is_main:
                save_final(model.lm, tokenizer, final, state_dict=whole, config=config)
        elif world.is_main and tokenizer is None:  # a denoiser: final/ is the whole pipeline folder
            from preftune.diffusion.denoiser import save_pipeline

            save_pipeline(model, config.model, final)
        elif world.is_main:
            from preftune.rl.ppo import save_without_value_head

            save_without_value_head(model, lambda: save_final(model, tokenizer, final, config=config), final)
    except BaseException as err:  # (a stop signal too: `Finishing` says that final/ was not written)
        if world.is_main:
            shutil.rmtree(final.with_name(final.name + ".tmp"), ignore_errors=True)
        if not isinstance(err, Exception):
            raise
        code = ckpt.os_error_number(err)
        if code in ckpt.NO_SPACE and not isinstance(err, OSError):  # safetensors' own error type
            raise OSError(code, os.strerror(code), str(final)) from err
        raise


def _fsdp_optimizer_loader(model: Any, optimizer: Any) -> Any:
    """Load a checkpoint's optimizer state into the sharded optimizer (each rank keeps its shard)."""
    from preftune.models.sharding import load_full_optimizer_state

    return lambda state: load_full_optimizer_state(model, optimizer, state)
