"""FSDP2 (`torch.distributed.fsdp.fully_shard`) for the policy: parameters, gradients and optimizer state
sharded over the processes of a `torchrun` job (nccl on GPUs; gloo on CPU, which is what the tests use).

Units. Each decoder layer is its own unit (gathered for its forward and backward, then freed). The root
unit holds the rest — embeddings, final norm and LM head — and is `ShardedPolicy`, a module whose
forward is the whole log-prob computation (`example_stats`). That is the point of the wrapper: the
log-prob code runs the decoder body and then the LM head in chunks, never the causal LM's own forward,
so FSDP's hooks on the causal LM would not fire and the embeddings would stay sharded. With the
embeddings and the head in one unit a tied head is simply the same parameter.

Gradients are reduce-scattered with a divide factor of 1 (a SUM): every rank's loss is already its
share of the global-batch loss (see `preftune.train.distributed`), so the sum is the exact gradient.

Every FSDP forward is a collective: all ranks must run the same number of forwards and backwards, which
`preftune.train.loop` ensures by padding a rank's micro-batches with a zero-weighted one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from preftune.errors import ConfigError
from preftune.types import Example


class ShardedPolicy(nn.Module):
    """A causal LM whose forward returns per-sequence statistics: `(logps, lengths, token_logps)`.

    `preftune.models.logprobs.example_stats(policy, examples, ...)` calls this forward, so callers do
    not change. `config` is the causal LM's, so the reference-cache fingerprint is the same as for the
    unsharded model.
    """

    is_sharded_policy = True

    def __init__(self, lm: nn.Module) -> None:
        super().__init__()
        self.lm = lm

    @property
    def config(self) -> Any:
        return self.lm.config

    def disable_adapter(self) -> Any:
        """A LoRA (peft) policy's base weights alone: the `adapter` reference, and its cache pass."""
        return self.lm.disable_adapter()  # type: ignore[operator]

    def forward(
        self, examples: list[Example], token_logps: bool = False, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        from preftune.models.logprobs import example_stats

        stats = example_stats(self.lm, examples, token_logps=token_logps, **kwargs)
        return stats.logps, stats.lengths, stats.token_logps


def decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The causal LM's list of decoder layers (the `ModuleList` of `num_hidden_layers` blocks)."""
    n = getattr(lm.config, "num_hidden_layers", None) or getattr(lm.config, "n_layer", None)
    for module in lm.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n and n:
            return module
    raise ConfigError(
        f"fsdp: found no list of {n} decoder layers in {type(lm).__name__}; "
        "train it without fsdp (data parallel)"
    )


def tied_duplicates(lm: nn.Module) -> set[str]:
    """Names of tied weights (e.g. lm_head.weight and the embeddings) that a safetensors file leaves
    out: of each group sharing one tensor, `safetensors.torch.save_model` keeps the first name in
    sorted order, and so do we."""
    groups: dict[int, list[str]] = {}
    for name, t in lm.state_dict(keep_vars=True).items():
        groups.setdefault(id(t), []).append(name)
    return {name for names in groups.values() for name in sorted(names)[1:]}


def shard_policy(
    lm: nn.Module,
    *,
    device: torch.device,
    world_size: int,
    compute_dtype: torch.dtype | None = None,
    inference: bool = False,
) -> ShardedPolicy:
    """Wrap and shard `lm` in place (every rank must call this, with the same weights); return the root.

    `compute_dtype` (mixed precision): units gather their weights in this dtype and compute in it, while
    the sharded weights, gradients and optimizer state stay float32 and gradients are reduced in float32.
    `inference`: a model only run without gradients (a reference): the root unit is freed after each
    forward too (FSDP keeps a root gathered for the backward pass that training would run next).
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(device.type, (world_size,))
    mp = MixedPrecisionPolicy(
        param_dtype=compute_dtype, reduce_dtype=torch.float32 if compute_dtype else None
    )
    for layer in decoder_layers(lm):
        fully_shard(layer, mesh=mesh, mp_policy=mp)
    policy = ShardedPolicy(lm)
    fully_shard(policy, mesh=mesh, mp_policy=mp, reshard_after_forward=True if inference else None)
    for module in policy.modules():
        if isinstance(module, FSDPModule):
            # SUM, not the default mean: each rank's loss is already its share of the global loss. Forcing
            # plain SUM collectives also keeps gloo working (it has no PREMUL_SUM).
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)
    return policy


def release(model: Any) -> None:
    """Free the gathered weights a forward without gradients left behind (no-op unless `model` is a
    `ShardedPolicy`). FSDP keeps the root unit gathered after a forward for the backward pass that
    usually follows; after an evaluation or a reference pass none does, and the parameters must be
    shards again before anyone reads or updates them (TR-DPO sync, Accelerated PO, the optimizer)."""
    if not getattr(model, "is_sharded_policy", False):
        return
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded one: a collective for a DTensor (all ranks must call)."""
    full = getattr(t, "full_tensor", None)
    return full() if full is not None else t


def shard_like(tensors: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """Whole tensors named like `module`'s parameters, sharded as those parameters are (each rank keeps
    its own piece of the whole tensor it holds: no communication). Unsharded parameters pass through."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    params = dict(module.named_parameters())
    out: dict[str, torch.Tensor] = {}
    for name, t in tensors.items():
        p = params.get(name)
        if isinstance(p, DTensor):
            out[name] = distribute_tensor(t.to(p.device), p.device_mesh, p.placements, src_data_rank=None)
        else:
            out[name] = t
    return out


def full_state_dict(
    policy: ShardedPolicy, *, keep: bool, only: Callable[[str], bool] | None = None
) -> dict[str, torch.Tensor]:
    """The causal LM's state dict with whole tensors on the CPU, under its own (Hugging Face) names.

    A collective: every rank gathers tensor by tensor (one at a time, so a rank never holds more than
    one whole tensor beyond what it keeps); only ranks with `keep` return them (the others: {}). Tied
    names map to one shared tensor, so `save_pretrained` drops the tied copy as it does unsharded.
    `only(name)`: gather just those tensors (a LoRA run's adapter, not its frozen base).
    """
    out: dict[str, torch.Tensor] = {}
    gathered: dict[int, torch.Tensor] = {}  # tied names share one tensor, as in the unsharded model
    for name, t in policy.lm.state_dict(keep_vars=True).items():
        if only is not None and not only(name):
            continue
        if id(t) not in gathered:
            whole = full_tensor(t.detach())
            gathered[id(t)] = whole.cpu().clone() if keep else whole[:0]
        if keep:
            out[name] = gathered[id(t)]
    return out


def checkpoint_weights(policy: ShardedPolicy, *, keep: bool) -> dict[str, torch.Tensor]:
    """What a checkpoint stores, whole: for a LoRA (peft) policy its adapter weights (as
    `get_peft_model_state_dict` names them), else `full_state_dict` without tied duplicates — the tensors
    `safetensors.torch.save_model` writes for the unsharded model. Either way a checkpoint loads the same
    whether it was written sharded or not."""
    if hasattr(policy.lm, "peft_config"):
        from peft import get_peft_model_state_dict

        adapter = get_peft_model_state_dict(policy.lm)
        gathered = {k: full_tensor(v.detach()) for k, v in adapter.items()}
        return {k: v.cpu().clone() for k, v in gathered.items()} if keep else {}
    dups = tied_duplicates(policy.lm)
    return {k: v for k, v in full_state_dict(policy, keep=keep).items() if k not in dups}


def full_optimizer_state(policy: ShardedPolicy, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """The optimizer's state with whole tensors, keyed by parameter name (a collective: every rank calls
    it; rank 0 gets the state on its CPU, the others {} — torch's `get_optimizer_state_dict` with
    `full_state_dict=True, cpu_offload=True`)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_optimizer_state_dict(policy, optimizer, options=options)  # type: ignore[no-any-return]


def load_full_optimizer_state(
    policy: ShardedPolicy, optimizer: torch.optim.Optimizer, state: dict[str, Any]
) -> None:
    """Load a `full_optimizer_state` (every rank passes the whole state; each keeps its shard)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

    set_optimizer_state_dict(
        policy, optimizer, optim_state_dict=state, options=StateDictOptions(full_state_dict=True)
    )
