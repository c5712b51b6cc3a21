"""The named parts of a training run: its state, the sources of each phase's examples, one optimizer
step, and the hooks after it (log, guard, evaluate, save, stop on a signal).

    state  = RunState(...)                      what changes while training; what a checkpoint stores
    source = OfflinePhase(...)                  yields the examples of each step of one phase
    run    = Run(...)                           the fixed parts: config, objective, world, logger
    ref = run.begin_phase(state, source)
    while state.step_in_phase < source.steps:
        run.step(state, source.batch(state.step_in_phase), ref)
        run.after_step(state, source, ref, graceful)

`train/api.py` strings these together. A phase source is anything with `steps`, `examples` (what the
phase's reference must cover) and `batch(step)`: fixed offline examples today; an online phase's
source samples its batch from the policy.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from preftune.config import TrainConfig
from preftune.errors import TrainingError
from preftune.train import checkpoint as ckpt
from preftune.train import guards
from preftune.train.distributed import World, main_only
from preftune.train.logging import MetricsLogger, Progress
from preftune.train.loop import (
    Objective,
    batch_indices,
    evaluate_examples,
    gather_sums,
    objective_on_batch,
    reduce_gradients,
    sync_loss_state,
)
from preftune.train.setup import extrapolate, setup_reference, trainable_state
from preftune.train.signals import GracefulStop, stopped
from preftune.types import Example

LossState = dict[str, dict[str, torch.Tensor]]

_KEEP_ACCUMULATED_GRADS = True  # benchmarks' `grads` lever sets False: every step frees them


@dataclass
class RunState:
    """What changes while a run trains: the model and its optimizer, the position, the loss state.

    `phase`, `step_in_phase`: the next step to take; `global_step`: steps taken. `last`: the metrics
    of the last step; `last_good`: the newest checkpoint written; `apo_prev`: Accelerated PO's θ̂_t;
    `resume` / `extra`: what the checkpoint being resumed recorded (cleared once the phase has begun).
    `sampler`: the online sampler whose state (VADE's posterior) is checkpointed as `extra["sampler"]`.
    """

    model: Any
    params: list[torch.nn.Parameter]
    optimizer: Any
    scheduler: Any
    phase: int = 0
    step_in_phase: int = 0
    global_step: int = 0
    loss_state: LossState = field(default_factory=dict)
    last: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] = field(default_factory=dict)
    last_good: Path | None = None
    apo_prev: dict[str, torch.Tensor] | None = None
    resume: dict[str, Any] | None = None
    extra: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    sampler: Any = None  # an online phase's sampler: its state_dict() goes into each checkpoint


def held_grads(params: list[torch.nn.Parameter]) -> list[int]:
    """Indices of the parameters whose gradient buffer stays allocated (zeroed) between steps: a step
    adds into an existing buffer in another order than it forms a fresh gradient (the tied head's
    direct gradient, `models.direct_grads`), so a resumed run must start as the stopped run went on."""
    return [i for i, p in enumerate(params) if p.grad is not None]


def hold_grads(params: list[torch.nn.Parameter], held: Any, path: Path) -> None:
    """Allocate the zeroed gradient buffers a checkpoint's `grads_held` lists (none for a checkpoint
    written before it was recorded: that run resumes within float32 rounding)."""
    held = held or []
    if not isinstance(held, list) or not all(isinstance(i, int) and 0 <= i < len(params) for i in held):
        raise TrainingError(
            f"resume: {path / 'trainer_state.json'} lists gradient buffers {held!r} that this run's "
            f"{len(params)} trainable parameters do not have; it was edited or written by another "
            "model — resume from another checkpoint"
        )
    for i in held:
        params[i].grad = torch.zeros_like(params[i])


class PhaseSource(Protocol):
    """The examples of each optimizer step of one phase."""

    index: int
    steps: int

    @property
    def examples(self) -> Sequence[Example]: ...

    def batch(self, step: int) -> list[Example]: ...


@dataclass
class OfflinePhase:
    """A phase over fixed examples: step `s` takes the seeded batch `batch_indices(..., step=s)`, so the
    data position of a resumed run is its step number."""

    index: int
    data: list[Example]
    steps: int
    batch_size: int
    seed: int
    groups: list[int] | None = None  # `group_by_prompt`: one prompt's examples stay together

    @property
    def examples(self) -> Sequence[Example]:
        return self.data

    def batch(self, step: int) -> list[Example]:
        idx = batch_indices(
            len(self.data), self.batch_size, seed=self.seed, phase=self.index, step=step, groups=self.groups
        )
        return [self.data[i] for i in idx]


@dataclass
class Run:
    """The fixed parts of a run and the hooks around each optimizer step."""

    config: TrainConfig
    objective: Objective
    world: World
    out: Path
    eval_examples: list[Any]  # held-out Examples; an online run's held-out prompts (PromptRows)
    micro: int
    eval_micro: int
    autocast: torch.dtype | None
    total: int
    phases: int
    logger: MetricsLogger
    progress: Progress
    log: Callable[[str], None]
    data_digest: str = ""  # `data_digest` of the sources: each checkpoint records it
    image_rows: str = ""  # `image_rows_digest` of an offline diffusion run's sources (recorded too)

    def begin_phase(self, state: RunState, source: PhaseSource) -> Any:
        """Set up the phase's reference (rebuilt from the checkpoint when resuming mid-phase) and
        Accelerated PO's θ̂ (the previous round's un-extrapolated result; θ̂_0 = θ_0)."""
        mid = state.resume is not None and state.step_in_phase > 0
        ref = setup_reference(
            self.config,
            self.objective,
            state.model,
            source.index,
            [source.examples, [e for e in self.eval_examples if isinstance(e, Example)]],
            self.world,
            log=self.log,
            resume_state=state.resume if mid else None,
            resume_weights=state.extra.get("reference") if mid else None,
            steps=range(state.step_in_phase, source.steps),
        )
        if self.config.apo_alpha and state.apo_prev is None:
            saved = state.extra.get("apo_prev")
            state.apo_prev = saved if saved is not None else trainable_state(state.model)
            if self.world.fsdp and "apo_prev" in state.extra:  # saved whole: shard it like the params
                from preftune.models.sharding import shard_like

                state.apo_prev = shard_like(state.apo_prev, state.model)
        state.resume = None
        return ref

    def step(self, state: RunState, batch: list[Example], ref: Any, *, keep_grads: bool = False) -> None:
        """One optimizer step on `batch` (the global batch; this rank computes its share), with the
        non-finite guard on loss and gradient; sets `state.last`. `keep_grads`: the next step's batch
        is read, not generated (an offline phase), so its gradients may stay allocated (below)."""
        if not batch:  # an online step whose samples gave nothing to train on (no pair, nothing kept)
            self._empty_step(state)
            return
        t0 = time.perf_counter()
        config = self.config
        state_before = {k: dict(v) for k, v in state.loss_state.items()}
        sums = objective_on_batch(
            state.model,
            batch,
            objective=self.objective,
            reference=ref.provider,
            loss_state=state.loss_state,
            world=self.world,
            micro_batch_size=self.micro,
            backward=True,
            autocast=self.autocast,
        )
        metrics = gather_sums(sums, self.world)
        grad_norm = reduce_gradients(state.params, self.world, config.max_grad_norm)
        lr = float(state.scheduler.get_last_lr()[0])
        finite = bool(np.isfinite(metrics["loss"]) and np.isfinite(grad_norm))
        if not finite and config.on_nonfinite == "error":
            raise guards.nonfinite_step(state.global_step + 1, metrics["loss"], grad_norm, state.last_good)
        if finite:
            state.optimizer.step()
            state.scheduler.step()
        else:
            self.log(
                f"step {state.global_step + 1}: non-finite loss/gradient, step skipped (on_nonfinite=skip)"
            )
            state.loss_state.clear()  # a NaN must not enter running loss state (BCO's δ) either
            state.loss_state.update(state_before)
        # With gradient accumulation the later micro-batches hold every gradient anyway, so keeping them
        # (zeroed) does not raise the step's peak; the next step then neither maps and zero-fills fresh
        # buffers nor allocates the first micro-batch's head/embedding gradients (they add into .grad).
        # Not where the next batch is generated (rollouts, samples) with the gradients still held.
        accumulating = len(batch) > self.micro * self.world.size and not self.world.fsdp
        keep = keep_grads and accumulating and _KEEP_ACCUMULATED_GRADS
        state.optimizer.zero_grad(set_to_none=not keep)
        sync_loss_state(state.loss_state, self.world)
        state.global_step += 1
        state.step_in_phase += 1
        if config.ref_sync_every and state.global_step % config.ref_sync_every == 0:
            ref.provider.sync(state.model, config.ref_sync_alpha)
        seconds = max(time.perf_counter() - t0, 1e-9)
        unit = "images" if "images" in metrics else "tokens"  # an image run counts images, not tokens
        state.last = {
            **{k: v for k, v in metrics.items() if k not in ("tokens", "images", "examples")},
            "grad_norm": grad_norm,
            "lr": lr,
            f"{unit}_per_s": metrics[unit] / seconds,
            "examples_per_s": metrics["examples"] / seconds,
            "skipped": float(not finite),
        }

    def _empty_step(self, state: RunState) -> None:
        """A step without examples: no optimizer or scheduler update (as a skipped non-finite step)."""
        lr = float(state.scheduler.get_last_lr()[0])
        state.global_step += 1
        state.step_in_phase += 1
        state.last = {"loss": 0.0, "grad_norm": 0.0, "lr": lr, "tokens_per_s": 0.0, "examples_per_s": 0.0}
        state.last["skipped"] = 1.0

    def after_step(self, state: RunState, source: PhaseSource, ref: Any, graceful: GracefulStop) -> None:
        """Log; extrapolate at a round's end (Accelerated PO); stop on non-finite weights; evaluate;
        checkpoint when due or when a signal asked to stop (then stop)."""
        config = self.config
        phase_done = state.step_in_phase == source.steps
        if state.global_step % config.log_every == 0 or phase_done:
            self.logger.log(
                {"step": state.global_step, "split": "train", "phase": source.index, **state.last}
            )
        self.progress.update(state.global_step, state.last)
        if phase_done and state.apo_prev is not None:
            hat = trainable_state(state.model)
            extrapolate(state.model, state.apo_prev, config.apo_alpha)  # θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t)
            state.apo_prev = hat
        if not guards.weights_finite(state.params, self.world):  # before anything is evaluated or saved
            raise guards.nonfinite_weights(
                state.global_step, state.last, state.last_good, config.on_nonfinite
            )
        last_phase = source.index == self.phases - 1
        if self.eval_examples and (
            (config.eval_every and state.global_step % config.eval_every == 0) or (phase_done and last_phase)
        ):
            state.eval_metrics = self.evaluate(state, ref, source)
        # a source whose steps share a batch (online μ > 1) checkpoints and stops between batches only
        between = phase_done or state.step_in_phase % getattr(source, "iterations", 1) == 0
        signum = graceful.requested(self.world) if between else 0
        due = config.save_every and state.global_step % config.save_every == 0
        if between and (due or state.global_step == self.total or signum):
            position = (source.index + 1, 0) if phase_done else (source.index, state.step_in_phase)
            state.last_good = self.save(state, ref, position)
        if signum:
            raise stopped(signum, state.global_step, self.total, state.last_good, config.out, self.world)

    def evaluate(self, state: RunState, ref: Any, source: Any = None) -> dict[str, float]:
        """The objective and §5 metrics on the held-out examples (an online run: the held-out reward of
        greedy responses to its held-out prompts), logged as `split: eval`."""
        from preftune.rl.phase import OnlinePhase, held_out_reward

        if isinstance(source, OnlinePhase):
            reward = held_out_reward(state.model, source, self.eval_examples)
            self.logger.log({"step": state.global_step, "split": "eval", **reward})
            return reward
        metrics = evaluate_examples(
            state.model,
            self.eval_examples,
            objective=self.objective,
            reference=ref.provider,
            loss_state=state.loss_state,
            world=self.world,
            batch_size=self.eval_micro,
            autocast=self.autocast,
        )
        metrics = {k: v for k, v in metrics.items() if k not in ("tokens", "images")}
        self.logger.log({"step": state.global_step, "split": "eval", **metrics})
        return metrics

    def save(self, state: RunState, ref: Any, position: tuple[int, int]) -> Path:
        """Checkpoint `state` at `position` (the next step to take); rank 0 writes, every rank gathers."""
        world, config = self.world, self.config
        extra: dict[str, dict[str, torch.Tensor]] = {}
        moving = ref.moving_weights(position[0], config, keep=world.is_main)
        if moving is not None:
            extra["reference"] = moving
        sampler_state = state.sampler.state_dict() if state.sampler is not None else {}
        if sampler_state:
            extra["sampler"] = sampler_state
        if state.apo_prev is not None:
            apo_prev = state.apo_prev
            if world.fsdp:  # whole tensors, gathered by every rank in step
                from preftune.models.sharding import full_tensor

                apo_prev = {k: full_tensor(v) for k, v in apo_prev.items()}
            extra["apo_prev"] = apo_prev
        weights = optimizer_state = None
        if world.fsdp:  # gather whole tensors first: collectives, so every rank takes part
            from preftune.models.sharding import checkpoint_weights, full_optimizer_state

            weights = checkpoint_weights(state.model, keep=world.is_main)
            optimizer_state = full_optimizer_state(state.model, state.optimizer)
        trainer_state = {
            "phase": position[0],
            "step_in_phase": position[1],
            "total_steps": self.total,
            "reference_fingerprint": ref.fingerprint,
            "metrics": state.last,
            "fsdp": world.fsdp,
            "grads_held": held_grads(state.params),
            "data_digest": self.data_digest,
            **({"image_rows": self.image_rows} if self.image_rows else {}),
        }

        def write() -> None:
            ckpt.save_checkpoint(
                self.out / "checkpoints",
                state.global_step,
                model=state.model.lm if world.fsdp else state.model,
                optimizer=state.optimizer,
                scheduler=state.scheduler,
                trainer_state=trainer_state,
                loss_state=state.loss_state,
                keep_last=config.keep_last,
                extra=extra,
                weights=weights,
                optimizer_state=optimizer_state,
            )

        main_only(world, write)  # rank 0 writes; its error (a full disk) stops every rank
        return self.out / "checkpoints" / f"step-{state.global_step}"
