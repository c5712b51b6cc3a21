"""Data parallelism on torch.distributed: the same command under `torchrun` (gloo on CPU, nccl on GPU).

Every process sees the same global batch of each optimizer step and takes its own slice, so the
normalisers (global example and token counts) are known on every rank without communication. Each
rank sums its micro-batch losses divided by those *global* counts; gradients are then all-reduced
with SUM — this is exactly the gradient of the global-batch loss (what DDP computes after rescaling
its mean by the world size), whatever the world size and micro-batching. See docs/distributed.md.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")


@dataclass(frozen=True)
class World:
    """rank / world size of this process; `device` the one it computes on."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    fsdp: bool = False
    """The policy is sharded (FSDP2): every forward/backward is a collective, so all ranks must run
    the same number of them, and FSDP reduces the gradients itself."""

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init_world() -> World:
    """Join the process group torchrun set up (RANK/WORLD_SIZE env), or a world of one."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    if size <= 1:
        return World(device=device)
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=local_rank, device=device)


def shutdown(world: World) -> None:
    if world.size > 1 and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def all_reduce_sum(t: torch.Tensor, world: World) -> torch.Tensor:
    """In-place SUM over ranks (no-op in a world of one); returns `t`."""
    if world.size > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_grads(params: list[torch.nn.Parameter], world: World, bucket_bytes: int = 64 * 2**20) -> None:
    """SUM the gradients over ranks in flat buckets of ≤ `bucket_bytes` (per dtype), like DDP's buckets:
    few collectives, and no full-model float32 copy of the gradients."""
    if world.size <= 1:
        return
    grads: list[torch.Tensor] = []
    for p in params:
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    bucket: list[torch.Tensor] = []
    size = 0
    for g in grads:
        nbytes = g.numel() * g.element_size()
        if bucket and (g.dtype != bucket[0].dtype or size + nbytes > bucket_bytes):
            _reduce_bucket(bucket)
            bucket, size = [], 0
        bucket.append(g)
        size += nbytes
    if bucket:
        _reduce_bucket(bucket)


def _reduce_bucket(grads: list[torch.Tensor]) -> None:
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for g in grads:
        g.copy_(flat[offset : offset + g.numel()].view_as(g))
        offset += g.numel()


def broadcast_params(module: torch.nn.Module, world: World) -> None:
    """Make every rank start from rank 0's weights (all ranks load the same folder; this guards it)."""
    if world.size <= 1:
        return
    with torch.no_grad():
        for t in list(module.parameters()) + list(module.buffers()):
            dist.broadcast(t.data, src=0)


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()


def broadcast_object(obj: object, world: World) -> object:
    """Rank 0's `obj` on every rank."""
    if world.size <= 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def main_first(world: World, fn: Callable[[], T]) -> T:
    """Run `fn` on rank 0, then on the other ranks, which wait for it: rank 0 fills on-disk caches
    (tokenized data) that the others then read instead of redoing the work. An exception on rank 0 is
    raised on every rank (see `main_only`)."""
    if world.size <= 1:
        return fn()
    if world.is_main:
        return _run_and_announce(world, fn)
    _wait_for_main(world)
    return fn()


def main_only(world: World, fn: Callable[[], None]) -> None:
    """Run `fn` on rank 0 alone (preparing the run folder) while the other ranks wait. An exception
    on rank 0 is sent to every rank and raised there too, so that no rank waits forever at a later
    collective for a rank that has stopped."""
    if world.size <= 1:
        fn()
    elif world.is_main:
        _run_and_announce(world, fn)
    else:
        _wait_for_main(world)


def _run_and_announce(world: World, fn: Callable[[], T]) -> T:
    try:
        result = fn()
    except Exception as err:
        broadcast_object(err, world)
        raise
    broadcast_object(None, world)
    return result


def _wait_for_main(world: World) -> None:
    failed = broadcast_object(None, world)
    if isinstance(failed, Exception):
        raise failed
