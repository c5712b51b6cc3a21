"""The cached reference of a phase: which groups its log-probs are computed in, what the run's steps
use, from which model missing ones come, and when (per batch as training reaches it, or before the
first step) — see `preftune.models.reference`."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from contextlib import nullcontext
from typing import Any

import torch

from preftune.config import TrainConfig
from preftune.errors import TrainingError
from preftune.models.reference import (
    Blocks,
    CachedReference,
    Source,
    default_cache_dir,
    keys_of,
    load_cached,
    reference_fingerprint,
)
from preftune.train.batches import prompt_groups
from preftune.train.distributed import World, broadcast_object
from preftune.train.loop import Objective, batch_indices
from preftune.train.setup import ReferenceSetup, compute_dtype
from preftune.types import Example


def epoch_order(data: Sequence[Example], config: TrainConfig, *, phase: int, epoch: int) -> list[int]:
    """The example order of one epoch of a phase: `batch_indices`' permutation (one batch of all)."""
    n = len(data)
    groups = prompt_groups(data) if config.group_by_prompt else None
    return batch_indices(n, max(n, 1), seed=config.seed, phase=phase, step=epoch, groups=groups)


def reference_blocks(
    config: TrainConfig, phase: int, example_sets: Sequence[Sequence[Example]], world: World
) -> Blocks:
    """Groups: the phase's first-epoch batches (so that the first epoch computes each batch once, in the
    same micro-batches as the policy), then the held-out sets in consecutive batches."""
    micro = config.micro_batch_size or max(1, -(-config.batch_size // world.size))
    blocks = Blocks()
    data, *others = example_sets
    order = epoch_order(data, config, phase=phase, epoch=0)
    for i in range(0, len(order), config.batch_size):
        blocks.add([data[j] for j in order[i : i + config.batch_size]], micro)
    for examples in others:
        for i in range(0, len(examples), config.batch_size):
            blocks.add(examples[i : i + config.batch_size], config.eval_batch_size or micro)
    return blocks


def used_examples(
    data: Sequence[Example], steps: range | None, config: TrainConfig, phase: int
) -> Sequence[Example]:
    """The examples that `steps` of the phase train on (all of them when the steps cover an epoch)."""
    per_epoch = -(-len(data) // config.batch_size)
    if steps is None or len(steps) >= per_epoch:
        return data
    orders: dict[int, list[int]] = {}
    out: list[Example] = []
    for s in steps:
        epoch, b = divmod(s, per_epoch)
        if epoch not in orders:
            orders[epoch] = epoch_order(data, config, phase=phase, epoch=epoch)
        out.extend(data[i] for i in orders[epoch][b * config.batch_size : (b + 1) * config.batch_size])
    return out


def cached_reference(
    config: TrainConfig,
    objective: Objective,
    policy: Any,
    phase: int,
    example_sets: Sequence[Sequence[Example]],
    world: World,
    *,
    log: Callable[[str], None],
    resume_state: dict[str, Any] | None,
    steps: range | None,
) -> ReferenceSetup:
    """The cache strategy. The reference is `ref_model`, else the initial policy (LoRA: its base) in
    phase 0, the policy at the phase start later. With LoRA in phase 0 the reference weights stay in
    memory anyway, so missing entries are computed per batch as training reaches it; otherwise the
    entries of the batches `steps` will use (and the held-out sets) are computed now, with progress.
    A resumed run recomputes what the cache lost from the initial model (phase 0)."""
    root = default_cache_dir(config.cache_dir) / "reference"
    blocks = reference_blocks(config, phase, example_sets, world)
    plan = [*used_examples(example_sets[0], steps, config, phase), *(e for s in example_sets[1:] for e in s)]
    total = len(set(keys_of(plan)))
    lazy = phase == 0 and config.lora and not config.ref_model  # the policy's base weights never move

    def load(fingerprint: str) -> CachedReference:
        return load_cached(
            root,
            fingerprint,
            blocks,
            token_logps=objective.needs_token_logps,
            log=log,
            write=world.is_main,
            share=lambda table: broadcast_object(table, world),
        )

    stored = str((resume_state or {}).get("reference_fingerprint") or "") or None
    if stored is not None:
        ref = load(stored)
        if not ref.missing_groups(plan):
            log(f"reference: resumed from the cache {root / stored}; reference pass skipped")
            return ReferenceSetup(ref, "cache", stored)
        if phase > 0:
            raise TrainingError(
                f"resume: the reference cache {root / stored} lacks entries of this run and phase {phase}'s "
                "reference (the policy at the start of the phase) is not stored; restore the cache, or "
                "start the run again with another --out"
            )
    source, temporary = _source_model(config, policy, phase, world, resumed=stored is not None)
    fingerprint = reference_fingerprint(source, adapter_off=lazy, compute_dtype=compute_dtype(config))
    if stored is not None and fingerprint != stored:
        raise TrainingError(
            f"resume: the reference model {config.ref_model or config.model} is not the one the run started "
            f"with (fingerprint {fingerprint}, the checkpoint says {stored}); restore it or start a new run"
        )
    ref = ref if stored is not None else load(fingerprint)
    ref.source = _source(source, world, config, adapter_off=lazy, sharded=world.fsdp and not temporary)
    groups = ref.missing_groups(plan)
    folder = root / fingerprint
    missing = len({key for key in keys_of(plan) if ref.lacks(key)})
    if not groups:
        log(f"reference: all {total} sequences found in the cache ({folder}); reference pass skipped")
    elif lazy:
        log(
            f"reference: {total - missing} of {total} sequences in the cache ({folder}); the others are "
            "computed batch by batch as training reaches them"
        )
    else:
        log(f"reference: computing log-probs of {missing} of {total} sequences (cache {folder})")
        ref.compute(groups, progress=True)
    if not lazy:
        ref.source = None
    if temporary:
        del source
    return ReferenceSetup(ref, "cache", fingerprint)


def _source_model(
    config: TrainConfig, policy: Any, phase: int, world: World, *, resumed: bool
) -> tuple[Any, bool]:
    """(model, loaded for the pass only): `ref_model`; on a resume without LoRA the initial weights from
    the model folder (the policy has moved on); else the policy itself."""
    if phase == 0 and (config.ref_model or (resumed and not config.lora)):
        from preftune.models.load import load_causal_lm

        return load_causal_lm(config.ref_model or config.model, dtype=config.dtype).to(world.device), True
    return policy, False


def _source(model: Any, world: World, config: TrainConfig, *, adapter_off: bool, sharded: bool) -> Source:
    """How `model` computes: split over the ranks, every rank in step when it is sharded (FSDP casts by
    itself under mixed precision; an unsharded model computes under torch.autocast)."""
    dtype = compute_dtype(config)
    cast: Callable[[], Any] = nullcontext
    if dtype is not None and not sharded:
        cast = lambda: torch.autocast(world.device.type, dtype=dtype)  # noqa: E731
    return Source(
        model,
        adapter_off=adapter_off,
        rank=world.rank,
        size=world.size,
        gather=_gatherer(world),
        equal_forwards=sharded,
        cast=cast,
    )


def _gatherer(world: World) -> Callable[[list[Any]], list[Any]]:
    if world.size <= 1:
        return lambda x: x
    import torch.distributed as dist

    def gather(items: list[Any]) -> list[Any]:
        parts: list[Any] = [None] * world.size
        dist.all_gather_object(parts, items)
        return [x for part in parts for x in part]

    return gather
