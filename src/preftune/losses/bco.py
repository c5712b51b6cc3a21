"""Binary Classifier Optimization (Jung et al. 2024): each response is classified good/bad by its
implicit reward r = βρ shifted by δ, a running mean of the rewards seen so far (trainer state)."""

from __future__ import annotations

import torch

from preftune.errors import ConfigError
from preftune.losses.core import clean, finish, log_ratios, log_sigmoid, pair_metrics, valid_examples
from preftune.losses.pairwise_losses import BETA, pair_log_ratios
from preftune.losses.registry import HParam, LossOutput, register
from preftune.types import PreferenceBatch

MOMENTUM = HParam(
    0.0,
    "δ update: 0 = running mean over all rewards seen (reference implementation); m ∈ (0, 1] = "
    "exponential moving average δ ← (1−m)δ + m·mean(batch)",
    low=0.0,
    high=1.0,
)


def update_delta(
    state: dict[str, torch.Tensor], rewards: torch.Tensor, valid: torch.Tensor, momentum: float
) -> dict[str, torch.Tensor]:
    """New state {"delta", "count"} after seeing `rewards[valid]` (detached, float32 scalars).

    Running mean: δ' = (δ·n + Σ r) / (n + m) over the m new rewards; or, with momentum > 0, an EMA
    that starts at the first batch's mean. A batch with no valid rewards leaves the state unchanged.
    """
    r = rewards.detach().float()
    w = valid.float()
    m = w.sum()
    delta = state.get("delta", torch.zeros((), device=r.device)).float().to(r.device)
    count = state.get("count", torch.zeros((), device=r.device)).float().to(r.device)
    total = (r * w).sum()
    if momentum == 0.0:
        new_delta = torch.where(m > 0, (delta * count + total) / (count + m).clamp(min=1), delta)
    else:
        batch_mean = total / m.clamp(min=1)
        ema = torch.where(count > 0, (1 - momentum) * delta + momentum * batch_mean, batch_mean)
        new_delta = torch.where(m > 0, ema, delta)
    return {"delta": new_delta, "count": count + m}


@register(
    "bco",
    kind="pairwise",
    needs_reference=True,
    stateful=True,
    hparams={"beta": BETA, "delta_momentum": MOMENTUM},
    paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (BCO)",
    equation="§4, BCO loss with reward shift δ (eq. number not verified: paper text not reachable)",
)
def bco(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, delta_momentum: float
) -> LossOutput:
    """BCO: −log σ(βρ_w − δ) − log σ(−(βρ_l − δ)), δ the running mean of the implicit rewards.

    Jung et al. 2024. δ is updated with this batch's chosen and rejected rewards first and then
    used (detached), as the reference implementation does (checked: TRL's bco_pair updates
    RunningMoments with the mean of cat(chosen, rejected) rewards, then uses its mean as δ; TRL
    averages per-batch means, we average rewards — equal for equal batch sizes); it lives in
    `state` and is checkpointed. β = 0.1 default. With π_θ = π_ref and δ = 0 the loss is 2 log 2.
    Note: δ moves once per call, so with gradient accumulation it moves per micro-batch.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "bco")
    r_w, r_l = beta * rho_w, beta * rho_l
    new_state = update_delta(state, torch.cat([r_w, r_l]), torch.cat([valid, valid]), delta_momentum)
    delta = new_state["delta"]
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
    paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model Alignment (BCO)",
    equation="§4, BCO loss on unpaired binary feedback (eq. number not verified: paper text not reachable)",
)
def bco_unpaired(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, delta_momentum: float
) -> LossOutput:
    """BCO on single completions: −log σ(r − δ) if desirable (label 1), −log σ(−(r − δ)) if not.

    r = βρ, δ the running mean of all rewards seen (state, detached). Not implemented: the paper's
    optional underlying-distribution matching (density-ratio weights from a prompt classifier) —
    it needs a classifier over prompts, outside the loss's statistics.
    """
    valid = valid_examples(batch, 1)
    if batch.labels is None:
        raise ConfigError("loss 'bco_unpaired' needs a 0/1 label per completion (batch.labels)")
    r = beta * log_ratios(batch, "bco_unpaired")[:, 0]
    desirable = clean(batch.labels, valid) > 0.5
    new_state = update_delta(state, r, valid, delta_momentum)
    delta = new_state["delta"]
    losses = torch.where(desirable, -log_sigmoid(r - delta), -log_sigmoid(-(r - delta)))
    correct = torch.where(desirable, r > delta, r < delta).float()
    metrics = {"rewards/implicit": r, "rewards/accuracy": correct, "bco/delta": delta.expand_as(r)}
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, new_state)
