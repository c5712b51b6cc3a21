"""Binary Classifier Optimization (Jung et al. 2024): each response is classified good/bad by its
implicit reward r = βρ shifted by δ, a running mean of the rewards seen so far (trainer state,
updated once per optimizer step with the whole global batch)."""

from __future__ import annotations

import torch

from preftune.errors import ConfigError
from preftune.losses.core import clean, finish, log_ratios, log_sigmoid, pair_metrics, valid_examples
from preftune.losses.pairwise_losses import BETA, pair_log_ratios
from preftune.losses.registry import BatchStatistic, HParam, LossOutput, register
from preftune.types import PreferenceBatch

MOMENTUM = HParam(
    0.0,
    "δ update: 0 = running mean over all rewards seen (reference implementation); m ∈ (0, 1] = "
    "exponential moving average δ ← (1−m)δ + m·mean(batch)",
    low=0.0,
    high=1.0,
)
RUNNING = HParam(True, "keep the running reward shift δ (paper); false: δ = 0, TRL 1.16's bco_pair")


def update_delta(
    state: dict[str, torch.Tensor], total: torch.Tensor, m: torch.Tensor, momentum: float
) -> dict[str, torch.Tensor]:
    """New state {"delta", "count"} after seeing m new rewards that sum to `total` (detached scalars).

    Running mean: δ' = (δ·n + Σ r) / (n + m); or, with momentum > 0, an EMA δ' = (1−m)δ + m·mean
    that starts at the first batch's mean. A batch with no valid rewards leaves the state unchanged.
    """
    total, m = total.detach().float(), m.detach().float()
    delta = state.get("delta", torch.zeros((), device=total.device)).float().to(total.device)
    count = state.get("count", torch.zeros((), device=total.device)).float().to(total.device)
    if momentum == 0.0:
        new_delta = torch.where(m > 0, (delta * count + total) / (count + m).clamp(min=1), delta)
    else:
        batch_mean = total / m.clamp(min=1)
        ema = torch.where(count > 0, (1 - momentum) * delta + momentum * batch_mean, batch_mean)
        new_delta = torch.where(m > 0, ema, delta)
    return {"delta": new_delta, "count": count + m}


def reward_shift(
    state: dict[str, torch.Tensor],
    rewards: torch.Tensor,
    valid: torch.Tensor,
    momentum: float,
    running: bool,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(δ, new running state) for rewards [N] with validity [N].

    δ = 0 without a running shift; the global batch's δ when the trainer computed it (state holds
    "batch_delta", already updated: returned as is); else the state updated with this batch.
    """
    if not running:
        return torch.zeros((), device=rewards.device), {}
    if "batch_delta" in state:
        return state["batch_delta"].detach().float(), {k: v for k, v in state.items() if k != "batch_delta"}
    w = valid.float()
    new_state = update_delta(state, (rewards.detach().float() * w).sum(), w.sum(), momentum)
    return new_state["delta"], new_state


def delta_state(
    state: dict[str, torch.Tensor],
    sums: dict[str, torch.Tensor],
    *,
    delta_momentum: float,
    running_delta: bool = True,
    **_: object,
) -> dict[str, torch.Tensor]:
    """The state for every micro-batch of a step: δ updated once with the global batch's rewards."""
    if not running_delta:
        return dict(state)
    new_state = update_delta(state, sums["reward_sum"], sums["count"], delta_momentum)
    return {**new_state, "batch_delta": new_state["delta"]}


def pair_reward_sums(batch: PreferenceBatch, *, beta: float, **_: object) -> dict[str, torch.Tensor]:
    """Σ βρ over the chosen and rejected responses of the valid pairs, and their count."""
    rho_w, rho_l, valid = pair_log_ratios(batch, "bco")
    w = valid.float()
    return {"reward_sum": (beta * (rho_w + rho_l) * w).sum().detach(), "count": 2.0 * w.sum()}


def unpaired_reward_sums(batch: PreferenceBatch, *, beta: float, **_: object) -> dict[str, torch.Tensor]:
    """Σ βρ over the valid completions, and their count."""
    w = valid_examples(batch, 1).float()
    r = beta * log_ratios(batch, "bco_unpaired")[:, 0]
    return {"reward_sum": (r * w).sum().detach(), "count": w.sum()}


@register(
    "bco",
    kind="pairwise",
    needs_reference=True,
    stateful=True,
    hparams={"beta": BETA, "delta_momentum": MOMENTUM, "running_delta": RUNNING},
    batch_statistic=BatchStatistic(pair_reward_sums, delta_state),
    paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (BCO)",
    equation="§4, BCO loss with reward shift δ (eq. number not verified: paper text not reachable)",
)
def bco(
    batch: PreferenceBatch,
    state: dict[str, torch.Tensor],
    *,
    beta: float,
    delta_momentum: float,
    running_delta: bool = True,
) -> LossOutput:
    """BCO: −log σ(βρ_w − δ) − log σ(−(βρ_l − δ)), δ the running mean of the implicit rewards.

    Jung et al. 2024: δ is a moving average of the rewards, updated with this batch's chosen and
    rejected rewards first and then used (detached); it lives in `state` and is checkpointed. The
    trainer updates δ once per optimizer step with the whole global batch (all micro-batches and
    ranks, see `batch_statistic`); called directly, the loss updates it with its own batch.
    TRL 1.16's `bco_pair` keeps no running δ: it is −log σ(βρ_w) − log σ(−βρ_l), i.e. δ = 0 —
    `running_delta=false` here (tested against TRL's expression). β = 0.1 default. With
    π_θ = π_ref and δ = 0 the loss is 2 log 2.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "bco")
    r_w, r_l = beta * rho_w, beta * rho_l
    delta, new_state = reward_shift(
        state, torch.cat([r_w, r_l]), torch.cat([valid, valid]), delta_momentum, running_delta
    )
    losses = -log_sigmoid(r_w - delta) - log_sigmoid(-(r_l - delta))
    metrics = pair_metrics(r_w, r_l)
    metrics["bco/delta"] = delta.expand_as(r_w)
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, new_state)


@register(
    "bco_unpaired",
    kind="unpaired",
    needs_reference=True,
    stateful=True,
    hparams={"beta": BETA, "delta_momentum": MOMENTUM},
    batch_statistic=BatchStatistic(unpaired_reward_sums, delta_state),
    paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (BCO)",
    equation="§4, BCO loss on unpaired binary feedback (eq. number not verified: paper text not reachable)",
)
def bco_unpaired(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, delta_momentum: float
) -> LossOutput:
    """BCO on single completions: −log σ(r − δ) if desirable (label 1), −log σ(−(r − δ)) if not.

    r = βρ, δ the running mean of all rewards seen (state, detached; the trainer updates it once
    per step with the global batch, as for `bco`). TRL 1.16 no longer ships a BCO trainer for
    unpaired data. Not implemented: the paper's
    optional underlying-distribution matching (density-ratio weights from a prompt classifier) —
    it needs a classifier over prompts, outside the loss's statistics.
    """
    valid = valid_examples(batch, 1)
    if batch.labels is None:
        raise ConfigError("loss 'bco_unpaired' needs a 0/1 label per completion (batch.labels)")
    r = beta * log_ratios(batch, "bco_unpaired")[:, 0]
    desirable = clean(batch.labels, valid) > 0.5
    delta, new_state = reward_shift(state, r, valid, delta_momentum, True)
    losses = torch.where(desirable, -log_sigmoid(r - delta), -log_sigmoid(-(r - delta)))
    correct = torch.where(desirable, r > delta, r < delta).float()
    metrics = {"rewards/implicit": r, "rewards/accuracy": correct, "bco/delta": delta.expand_as(r)}
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, new_state)
