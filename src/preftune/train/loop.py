"""One optimizer step, exactly normalised, and evaluation — the pieces `api.train` strings together.

Exact reduction (docs/algorithms.md §6; torchtitan's habit): every rank sees the whole
global batch of a step, so it knows the normalisers without communication — E, the global example
count, and for `reduction="token"` terms T, the global token count. Each micro-batch contributes
Σ_term w · Σ_e loss_e / (E or T) to the backward pass; gradients are then SUMmed over ranks. The
gradient is the gradient of the global-batch loss for any micro-batch size and world size.
Losses with a batch statistic (KTO's z₀, BCO's δ) get it from a no-gradient pre-pass over the
whole global batch, summed over ranks (`statistic_sums`, `reduce_statistics`, `statistic_states`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from preftune.models.direct_grads import grads_into_params
from preftune.models.sharding import full_tensor, release
from preftune.train.batches import build_batch, micro_batches, shard, token_count
from preftune.train.distributed import World, all_reduce_grads, all_reduce_sum
from preftune.train.metrics import MetricSums, preference_metrics
from preftune.types import Example, SequenceStats


class Reference(Protocol):
    def stats(self, examples: Sequence[Example], token_logps: bool = False) -> SequenceStats: ...


@dataclass
class Objective:
    """A run's weighted sum of registered loss terms and what they need from the trainer."""

    terms: list[tuple[Any, float, dict[str, Any]]]  # (LossSpec, weight, validated hyper-parameters)
    kind: str
    teachers: Any = None  # distillation (kind "distill"): (π_dpo, π_ref or None), see train.distill_step

    @property
    def needs_reference(self) -> bool:
        return any(s.needs_reference for s, _, _ in self.terms)

    @property
    def needs_token_logps(self) -> bool:
        return any(s.needs_token_logps for s, _, _ in self.terms)

    @property
    def needs_mismatched(self) -> bool:
        return any(s.needs_mismatched for s, _, _ in self.terms)

    @property
    def beta(self) -> float | None:
        return next((float(h["beta"]) for _, _, h in self.terms if "beta" in h), None)


def batch_indices(
    n: int, batch_size: int, *, seed: int, phase: int, step: int, groups: Sequence[int] | None = None
) -> list[int]:
    """Example indices of optimizer step `step` (0-based, within `phase`): a seeded permutation per
    epoch, cut into consecutive batches (the last one of an epoch may be smaller). Depends only on its
    arguments, so the data position of a resumed run is its step number.

    `groups` (a group id per example, ids 0..G-1, e.g. `prompt_groups`): permute the groups instead and
    keep each group's examples together, in data order — the pairs of one prompt then share batches and
    packed rows. With every example in a group of its own the order is the ungrouped one."""
    per_epoch = math.ceil(n / batch_size)
    epoch, b = divmod(step, per_epoch)
    g = torch.Generator().manual_seed(seed * 1_000_003 + phase * 10_007 + epoch)
    if groups is None:
        perm = torch.randperm(n, generator=g).tolist()
    else:
        members: list[list[int]] = [[] for _ in range(max(groups, default=-1) + 1)]
        for i, gid in enumerate(groups):
            members[gid].append(i)
        perm = [i for gid in torch.randperm(len(members), generator=g).tolist() for i in members[gid]]
    return perm[b * batch_size : (b + 1) * batch_size]


def objective_on_batch(
    model: Any,
    global_batch: Sequence[Example],
    *,
    objective: Objective,
    reference: Reference | None,
    loss_state: dict[str, dict[str, torch.Tensor]],
    world: World,
    micro_batch_size: int,
    backward: bool,
    autocast: torch.dtype | None = None,
    batch_states: dict[str, dict[str, torch.Tensor]] | None = None,
) -> MetricSums:
    """Forward (and backward) this rank's share of `global_batch`; return its metric sums.

    Totals: `loss` and `loss/TERM` (already divided by the global counts: summing them over ranks
    gives the global loss), `tokens`, `examples`. Means: the losses' per-example metrics and §5's.
    `loss_state` is updated in place by stateful terms (pass a copy to leave it untouched).
    `autocast`: run the policy and reference forwards under `torch.autocast` in this dtype (mixed
    precision); the losses are computed from their float32 log-probs.
    `batch_states`: the states of the terms with a batch statistic (`statistic_states`); computed
    here over the global batch (a no-gradient pre-pass, summed over ranks) when not given.
    """
    from preftune.models.logprobs import example_stats

    if objective.kind in ("policy", "distill"):  # online methods; distillation (teacher distributions)
        from preftune.train.distill_step import distill_on_batch
        from preftune.train.policy_step import policy_on_batch

        step = policy_on_batch if objective.kind == "policy" else distill_on_batch
        return step(model, global_batch, objective=objective, reference=reference, world=world,
                    micro_batch_size=micro_batch_size, backward=backward, autocast=autocast)  # fmt: skip
    if batch_states is None and any(s.batch_statistic is not None for s, _, _ in objective.terms):
        local = statistic_sums(
            model,
            global_batch,
            objective=objective,
            reference=reference,
            world=world,
            micro_batch_size=micro_batch_size,
            autocast=autocast,
        )
        batch_states = statistic_states(objective, reduce_statistics(local, world), loss_state, world.device)
    batch_states = batch_states or {}
    need_tok = objective.needs_token_logps
    denominators = [
        float(len(global_batch)) if spec.reduction == "example" else max(token_count(spec, global_batch), 1.0)
        for spec, _, _ in objective.terms
    ]
    prepare = getattr(reference, "prepare", None)
    if prepare is not None:  # a cached reference computes what it lacks (all ranks, in step)
        prepare(global_batch)
    sums = MetricSums()
    mine = shard(global_batch, world.rank, world.size)
    groups = micro_batches(mine, micro_batch_size)
    for _ in range(padding_forwards(len(global_batch), len(groups), micro_batch_size, world)):
        _padding_pass(model, global_batch[0], reference, world, backward, autocast)
    for micro in groups:
        with torch.set_grad_enabled(backward):
            with compute(autocast, world):
                policy = example_stats(model, micro, token_logps=need_tok)
                ref = reference.stats(micro, token_logps=need_tok) if reference is not None else None
            batch = build_batch(micro, policy, ref)
            total = _terms_loss(batch, objective, denominators, batch_states, loss_state, sums)
        if backward and total.requires_grad:
            with grads_into_params():  # (the head's weight gradient straight into .grad)
                total.backward()
        sums.add_total("loss", total)
        images = sum(len(e.response_ids) for e in micro if "latents" in e.meta)  # diffusion examples
        sums.add_total("images" if images else "tokens", float(images or sum(e.num_tokens for e in micro)))
        sums.add_total("examples", float(len(micro)))
        preference_metrics(batch, sums, unpaired=objective.kind == "unpaired")
    return sums


def _padding_pass(
    model: Any,
    example: Example,
    reference: Reference | None,
    world: World,
    backward: bool,
    autocast: torch.dtype | None,
) -> None:
    """FSDP: this rank has fewer micro-batches than another; a zero-weighted pass keeps the
    collectives (one all-gather per unit per forward, one reduce-scatter per backward) in step."""
    from preftune.models.logprobs import example_stats

    with torch.set_grad_enabled(backward), compute(autocast, world):
        dummy = example_stats(model, [example])
        if getattr(reference, "collective", False):  # a sharded reference model: in step too
            reference.stats([example])  # type: ignore[union-attr]
        if backward:
            (dummy.logps.sum() * 0.0).backward()


def _terms_loss(
    batch: Any,
    objective: Objective,
    denominators: list[float],
    batch_states: dict[str, dict[str, torch.Tensor]],
    loss_state: dict[str, dict[str, torch.Tensor]],
    sums: MetricSums,
) -> torch.Tensor:
    """The weighted sum of the objective's terms on one micro-batch; their metrics go into `sums`
    (a later term's metric named like the first term's is prefixed with the term's name)."""
    total: torch.Tensor | None = None
    first_names: set[str] = set()
    for i, ((spec, weight, hparams), denom) in enumerate(zip(objective.terms, denominators)):
        state = batch_states.get(spec.name, loss_state.get(spec.name, {}))
        out = spec.run(batch, dict(state), hparams)
        term = out.losses.float().sum() / denom
        total = weight * term if total is None else total + weight * term
        if spec.stateful:
            loss_state[spec.name] = {k: v.detach() for k, v in out.state.items()}
        if len(objective.terms) > 1:
            sums.add_total(f"loss/{spec.name}", term)
        for name, values in out.metrics.items():
            key = name if i == 0 or name not in first_names else f"{spec.name}/{name}"
            if i == 0:
                first_names.add(name)
            sums.add(key, values)
    assert total is not None
    return total


def statistic_sums(
    model: Any,
    global_batch: Sequence[Example],
    *,
    objective: Objective,
    reference: Reference | None,
    world: World,
    micro_batch_size: int,
    autocast: torch.dtype | None = None,
) -> dict[str, dict[str, float]]:
    """This rank's sums of every term's batch statistic over its share of `global_batch`.

    A forward pass without gradients over the same micro-batches (and FSDP padding passes) as the
    step itself; {term name: {sum name: value}}, {} when no term has a batch statistic.
    """
    from preftune.models.logprobs import example_stats

    terms = [(s, h) for s, _, h in objective.terms if s.batch_statistic is not None]
    if not terms:
        return {}
    need_tok = objective.needs_token_logps
    groups = micro_batches(shard(global_batch, world.rank, world.size), micro_batch_size)
    sums: dict[str, dict[str, float]] = {spec.name: {} for spec, _ in terms}
    with torch.no_grad():
        for _ in range(padding_forwards(len(global_batch), len(groups), micro_batch_size, world)):
            with compute(autocast, world):
                example_stats(model, [global_batch[0]])
                if getattr(reference, "collective", False):
                    reference.stats([global_batch[0]])  # type: ignore[union-attr]
        for micro in groups:
            with compute(autocast, world):
                policy = example_stats(model, micro, token_logps=need_tok)
                ref = reference.stats(micro, token_logps=need_tok) if reference is not None else None
            batch = build_batch(micro, policy, ref)
            for spec, hparams in terms:
                assert spec.batch_statistic is not None
                for key, value in spec.batch_statistic.sums(batch, **hparams).items():
                    sums[spec.name][key] = sums[spec.name].get(key, 0.0) + float(value)
    return sums


def reduce_statistics(sums: dict[str, dict[str, float]], world: World) -> dict[str, dict[str, float]]:
    """Add every rank's `statistic_sums` (a rank with no examples contributes nothing)."""
    if world.size <= 1 or not sums:
        return sums
    import torch.distributed as dist

    parts: list[Any] = [None] * world.size
    dist.all_gather_object(parts, sums)
    total: dict[str, dict[str, float]] = {name: {} for name in sums}
    for part in parts:
        for name, values in part.items():
            for key, value in values.items():
                total[name][key] = total[name].get(key, 0.0) + value
    return total


def statistic_states(
    objective: Objective,
    sums: dict[str, dict[str, float]],
    loss_state: dict[str, dict[str, torch.Tensor]],
    device: torch.device | None = None,
) -> dict[str, dict[str, torch.Tensor]]:
    """Each statistic term's state for the step's micro-batches, from the global sums (float32)."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for spec, _, hparams in objective.terms:
        if spec.batch_statistic is None or not sums.get(spec.name):
            continue
        given = {k: torch.tensor(v, dtype=torch.float32, device=device) for k, v in sums[spec.name].items()}
        state = dict(loss_state.get(spec.name, {}))
        out[spec.name] = spec.batch_statistic.state(state, given, **hparams)
    return out


def compute(dtype: torch.dtype | None, world: World) -> Any:
    """`torch.autocast` in `dtype` on this rank's device, or nothing (full precision)."""
    return torch.autocast(world.device.type, dtype=dtype) if dtype is not None else nullcontext()


def padding_forwards(global_count: int, own_groups: int, micro_batch_size: int, world: World) -> int:
    """Zero-weighted forwards this rank adds so that every rank runs as many as the busiest one (FSDP
    only: the busiest rank holds ceil(global_count / world size) examples)."""
    if not world.fsdp or global_count == 0:
        return 0
    busiest = -(-global_count // world.size)
    return -(-busiest // micro_batch_size) - own_groups


def gather_sums(sums: MetricSums, world: World) -> dict[str, float]:
    """Merge every rank's sums; return the step's metrics (identical on every rank)."""
    if world.size > 1:
        import torch.distributed as dist

        states: list[Any] = [None] * world.size
        dist.all_gather_object(states, sums.state())
        merged = MetricSums()
        for st in states:
            merged.merge(st)
        sums = merged
    return sums.result()


def reduce_gradients(params: list[torch.nn.Parameter], world: World, max_grad_norm: float) -> float:
    """SUM gradients over ranks, clip the global norm (when > 0), return the norm before clipping.

    Under FSDP the backward pass has already reduce-scattered the gradients (a SUM, see
    `preftune.models.sharding`); the norm of sharded gradients is a DTensor over all shards."""
    if not world.fsdp:
        all_reduce_grads(params, world)
    limit = max_grad_norm if max_grad_norm > 0 else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(params, limit, error_if_nonfinite=False)
    return float(full_tensor(norm))


def sync_loss_state(loss_state: dict[str, dict[str, torch.Tensor]], world: World) -> None:
    """Average running loss state (e.g. BCO's δ) over ranks so that every rank keeps the same."""
    if world.size <= 1:
        return
    for state in loss_state.values():
        for k, v in state.items():
            t = v.detach().clone().float()
            all_reduce_sum(t, world)
            state[k] = (t / world.size).to(v.dtype)


def evaluate_examples(
    model: Any,
    examples: Sequence[Example],
    *,
    objective: Objective,
    reference: Reference | None,
    loss_state: dict[str, dict[str, torch.Tensor]],
    world: World,
    batch_size: int,
    autocast: torch.dtype | None = None,
) -> dict[str, float]:
    """The objective and §5 metrics over `examples` (no gradients, loss state untouched).

    The whole set is one "global batch": the loss is normalised by its example/token counts.
    """
    was_training = model.training
    model.eval()
    try:
        sums = objective_on_batch(
            model,
            examples,
            objective=objective,
            reference=reference,
            loss_state={k: dict(v) for k, v in loss_state.items()},
            world=world,
            micro_batch_size=batch_size,
            backward=False,
            autocast=autocast,
        )
    finally:
        release(model)
        model.train(was_training)
    return gather_sums(sums, world)
