"""The trainer's step for objectives of kind "policy" (online methods): per-token log-probs of the
sampled responses, the policy terms, and exact reduction over micro-batches and ranks.

Each example is a group (one prompt, K = G sampled branches, `preftune.rl.phase`), computed in the
packed prefix-shared layout: the prompt once for all G. Per micro-batch the policy's per-token
log-probs are recomputed at the sampling temperature over the support the sampler kept
(`min_logits`), so with the unchanged weights of the sampling step the ratio π_θ/π_old is 1. The
loss is `policy_objective` with the *global* denominators of the whole step's batch
(`global_denominators`), so gradients summed over micro-batches and ranks equal the full-batch
gradient (the DAPO token mean, GRPO's sequence mean or Dr. GRPO's N · max_len).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from preftune.losses.policy_losses import PolicyBatch, global_denominators, kl_tokens, policy_objective
from preftune.models.direct_grads import grads_into_params
from preftune.rl.ppo import value_head
from preftune.train.batches import micro_batches, shard
from preftune.train.distributed import World
from preftune.train.metrics import MetricSums
from preftune.types import Example, SequenceStats


def _pad(rows: list[torch.Tensor], width: int, fill: float = 0.0) -> torch.Tensor:
    return torch.cat([torch.nn.functional.pad(r, (0, width - r.shape[-1]), value=fill) for r in rows])


def _mask(examples: Sequence[Example], width: int | None = None) -> torch.Tensor:
    lengths = torch.tensor([len(r) for e in examples for r in e.response_ids])
    width = width if width is not None else int(lengths.max()) if len(lengths) else 0
    return torch.arange(width)[None, :] < lengths[:, None]


def policy_batch(
    examples: Sequence[Example], policy: SequenceStats, ref: SequenceStats | None, device: torch.device
) -> PolicyBatch:
    """The `PolicyBatch` of `examples` (groups) from the policy's (and reference's) token log-probs."""
    assert policy.token_logps is not None
    width = policy.token_logps.shape[1]
    adv: list[torch.Tensor] = [e.meta["advantages"] for e in examples]  # type: ignore[misc]
    token_level = adv[0].dim() == 2
    critic = {}  # PPO family: the value head's values, the rollout's values and the returns
    if policy.values is not None and "values" in examples[0].meta:
        critic["values"] = policy.values
        for name, key in (("old_values", "values"), ("returns", "returns")):
            critic[name] = _pad([e.meta[key] for e in examples], width).to(device)  # type: ignore[misc]
    return PolicyBatch(
        policy_token_logps=policy.token_logps,
        mask=_mask(examples, width).to(device),
        advantages=(_pad(adv, width) if token_level else torch.cat(adv)).to(device),
        old_token_logps=_pad([e.meta["old_logps"] for e in examples], width).to(device),  # type: ignore[misc]
        ref_token_logps=None if ref is None else ref.token_logps,
        max_len=int(examples[0].meta["max_len"]),  # type: ignore[call-overload]
        **critic,
    )


def policy_on_batch(
    model: Any,
    global_batch: Sequence[Example],
    *,
    objective: Any,
    reference: Any,
    world: World,
    micro_batch_size: int,
    backward: bool,
    autocast: torch.dtype | None = None,
) -> MetricSums:
    """Forward (and backward) this rank's share of the step's groups; return its metric sums:
    `loss`, `loss/TERM` (several terms), `tokens`, `examples`, and per-sequence means `ratio`
    (π_θ/π_old over tokens), `kl` (k3 to the reference, when there is one)."""
    from preftune.models.logprobs import example_stats
    from preftune.train.loop import compute

    temperature = float(global_batch[0].meta["temperature"])  # type: ignore[arg-type]
    whole = PolicyBatch(torch.zeros(()), _mask(global_batch), torch.zeros(()))
    denominators = global_denominators(objective.terms, [whole])
    sums = MetricSums()
    for micro in micro_batches(shard(global_batch, world.rank, world.size), micro_batch_size):
        with torch.set_grad_enabled(backward):
            with compute(autocast, world):
                support = [e.meta["min_logits"].to(world.device) for e in micro]  # type: ignore[union-attr]
                policy = example_stats(
                    model, list(micro), token_logps=True, temperature=temperature, min_logits=support,
                    value_head=value_head(model),
                )  # fmt: skip
                ref = None
                if reference is not None:
                    ref = reference.stats(micro, token_logps=True, temperature=temperature)
            batch = policy_batch(micro, policy, ref, policy.logps.device)
            total, parts = policy_objective(batch, objective.terms, denominators)
        if backward and total.requires_grad:
            with grads_into_params():  # (the head's weight gradient straight into .grad)
                total.backward()
        _metrics(sums, batch, total, parts, len(objective.terms) > 1)
        sums.add_total("tokens", float(sum(e.num_tokens for e in micro)))
        sums.add_total("examples", float(len(micro)))
    return sums


def _metrics(
    sums: MetricSums, batch: PolicyBatch, total: torch.Tensor, parts: dict[str, torch.Tensor], several: bool
) -> None:
    sums.add_total("loss", total)
    if several:
        for name, value in parts.items():
            sums.add_total(name, value)
    mask = batch.mask
    count = mask.float().sum(dim=1).clamp(min=1)
    valid = mask.any(dim=1)
    with torch.no_grad():
        logp = batch.masked(batch.policy_token_logps.detach())
        assert batch.old_token_logps is not None
        ratio = batch.masked(torch.exp(logp - batch.masked(batch.old_token_logps)))
        sums.add("ratio", ratio.sum(dim=1) / count, valid)
        if batch.ref_token_logps is not None:
            k3 = batch.masked(kl_tokens(logp, batch.masked(batch.ref_token_logps), "k3"))
            sums.add("kl", k3.sum(dim=1) / count, valid)
