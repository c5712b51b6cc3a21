"""Policy-gradient loss terms (kind "policy"): per-token losses on the policy's own samples.

A term reads a `PolicyBatch` — per-token log-probs of the sampled responses under the policy
(differentiable), the sampling ("old") policy and the reference, the advantages and the token mask —
and returns, per sequence, the *numerator* of its aggregation. The caller divides the sum over
micro-batches and ranks by the *global* denominator (`local_denominator` summed over every micro-batch
of every rank), so the gradient is the same for any micro-batch size and world size:

    aggregation               per-sequence numerator          denominator (global)
    token_mean (DAPO)         Σ_t m_t l_t                     Σ_{i,t} m_{i,t}   (tokens)
    seq_mean_token_mean (GRPO) Σ_t m_t l_t / |y_i|             number of sequences with |y_i| > 0
    seq_mean_token_sum_norm   Σ_t m_t l_t / max_len           number of sequences (N)
      (Dr. GRPO: divide by N · max_len, max_len the generation budget)

Policy terms live in their own registry (`POLICY_LOSSES`), separate from the offline loss zoo, and
combine by the same objective syntax: `parse_policy_objective("ppo_clip:1,kl:0.01")`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

import torch

from preftune.errors import ConfigError
from preftune.losses.core import safe_exp
from preftune.losses.registry import HParam, LossFn, LossOutput, LossSpec, get, parse_objective

Aggregation = Literal["token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm"]
AGGREGATIONS: tuple[str, ...] = ("token_mean", "seq_mean_token_mean", "seq_mean_token_sum_norm")
F = TypeVar("F", bound=LossFn)


@dataclass
class PolicyBatch:
    """What a policy term reads, for N sampled responses padded to T tokens.

    policy_token_logps: [N, T] log π_θ(y_t | x, y_<t) (carries gradients); any value where mask is False.
    mask:               [N, T] bool, True on response tokens.
    advantages:         [N] one per sequence, or [N, T] per token.
    old_token_logps:    [N, T] under the policy that sampled (π_old); None = on-policy (π_old = sg[π_θ]).
    ref_token_logps:    [N, T] under the reference (needed by `kl`).
    max_len:            Dr. GRPO's constant (the generation budget, max_new_tokens): the same for every
                        micro-batch; needed by `seq_mean_token_sum_norm`.
    values:             [N, T] the value head's V_t (differentiable), for the `value` term (PPO).
    old_values:         [N, T] V_t when the rollouts were scored (the centre of the value clip).
    returns:            [N, T] the value targets (GAE's Â + V).
    """

    policy_token_logps: torch.Tensor
    mask: torch.Tensor
    advantages: torch.Tensor
    old_token_logps: torch.Tensor | None = None
    ref_token_logps: torch.Tensor | None = None
    max_len: int | None = None
    values: torch.Tensor | None = None
    old_values: torch.Tensor | None = None
    returns: torch.Tensor | None = None

    def masked(self, x: torch.Tensor) -> torch.Tensor:
        """`x` in float32 with entries outside the mask set to 0 (before any arithmetic)."""
        return torch.where(self.mask.bool(), x.float(), torch.zeros((), device=x.device))

    def token_advantages(self) -> torch.Tensor:
        adv = self.advantages.float()
        return adv[:, None].expand(self.mask.shape) if adv.dim() == 1 else adv


POLICY_LOSSES: dict[str, LossSpec] = {}

AGGREGATION = HParam("token_mean", "how token losses are averaged", choices=AGGREGATIONS)


def register_policy(
    name: str, *, paper: str, equation: str, hparams: Mapping[str, HParam]
) -> Callable[[F], F]:
    """Decorator: add a policy term to `POLICY_LOSSES` (kind "policy", reduction "aggregation")."""

    def wrap(fn: F) -> F:
        if name in POLICY_LOSSES:
            raise ValueError(f"policy loss '{name}' registered twice")
        POLICY_LOSSES[name] = LossSpec(
            name=name,
            fn=fn,
            kind="policy",
            needs_reference=name == "kl",
            hparams={**hparams, "aggregation": AGGREGATION},
            paper=paper,
            equation=equation,
            needs_token_logps=True,
            reduction="aggregation",
        )
        return fn

    return wrap


def get_policy(name: str) -> LossSpec:
    """The registered policy term `name`; ConfigError with a "did you mean" if unknown."""
    return get(name, POLICY_LOSSES)


def parse_policy_objective(text: str) -> list[tuple[LossSpec, float]]:
    """Parse a weighted sum of policy terms, e.g. "ppo_clip:1,kl:0.04"."""
    from preftune import losses

    offline = [
        p.partition(":")[0].strip() for p in text.split(",") if p.partition(":")[0].strip() in losses.REGISTRY
    ]
    offline = [name for name in offline if name not in POLICY_LOSSES]
    if offline:
        raise ConfigError(
            f"objective '{text}': '{offline[0]}' is an offline loss of preference pairs, not a policy term; "
            f"an online preset's objective sums policy terms ({', '.join(POLICY_LOSSES)}) — to train "
            f"'{offline[0]}' on pairs of the policy's own samples, use online_dpo (--objective {offline[0]})"
        )
    return parse_objective(text, POLICY_LOSSES)


def aggregate(per_token: torch.Tensor, batch: PolicyBatch, aggregation: str) -> torch.Tensor:
    """Per-sequence numerators [N] of `aggregation` for token losses [N, T] (see the module table)."""
    sums = batch.masked(per_token).sum(dim=1)
    if aggregation == "token_mean":
        return sums
    if aggregation == "seq_mean_token_mean":
        return sums / batch.mask.float().sum(dim=1).clamp(min=1)
    if aggregation == "seq_mean_token_sum_norm":
        if batch.max_len is None or batch.max_len < 1:
            raise ConfigError(
                "aggregation 'seq_mean_token_sum_norm' needs the batch's max_len (the generation budget, "
                "max_new_tokens), the same for every micro-batch"
            )
        return sums / float(batch.max_len)
    raise ConfigError(f"unknown aggregation '{aggregation}' (known: {', '.join(AGGREGATIONS)})")


def local_denominator(batch: PolicyBatch, aggregation: str) -> float:
    """This micro-batch's share of the global denominator of `aggregation`: sum it over every
    micro-batch of every rank, then divide the summed numerators by the total."""
    lengths = batch.mask.float().sum(dim=1)
    if aggregation == "token_mean":
        return float(lengths.sum())
    if aggregation == "seq_mean_token_mean":
        return float((lengths > 0).float().sum())
    return float(batch.mask.shape[0])


def _log_ratio(batch: PolicyBatch) -> torch.Tensor:
    """log π_θ − log π_old per token (0 off the mask); on-policy when old_token_logps is None."""
    logp = batch.masked(batch.policy_token_logps)
    old = logp.detach() if batch.old_token_logps is None else batch.masked(batch.old_token_logps)
    return logp - old


def _seq_mean(x: torch.Tensor, batch: PolicyBatch) -> torch.Tensor:
    return batch.masked(x).sum(dim=1) / batch.mask.float().sum(dim=1).clamp(min=1)


@register_policy(
    "pg",
    paper="Williams 1992, REINFORCE; Li et al. 2023, ReMax (plain policy gradient, no ratio)",
    equation="l_t = −A_t · log π_θ(y_t | x, y_<t)",
    hparams={},
)
def pg(batch: PolicyBatch, state: dict[str, torch.Tensor], *, aggregation: str) -> LossOutput:
    """REINFORCE: −A · log π_θ per token (gradient −A ∇log π_θ)."""
    per_token = -batch.token_advantages() * batch.masked(batch.policy_token_logps)
    return LossOutput(aggregate(per_token, batch, aggregation))


@register_policy(
    "ppo_clip",
    paper=(
        "Schulman et al. 2017, PPO eq. 7; Yu et al. 2025, DAPO eq. 10 (clip-higher ε_high); Ye et al. 2020, "
        "dual-clip PPO; Zheng et al. 2025, GSPO eq. 5–7 (sequence ratio)"
    ),
    equation="l_t = −min(ρ_t A_t, clip(ρ_t, 1 − ε_low, 1 + ε_high) A_t); A < 0: min(l_t, −c·A_t)",
    hparams={
        "eps_low": HParam(0.2, "lower clip range ε_low", low=0.0, high=1.0),
        "eps_high": HParam(0.2, "upper clip range ε_high (DAPO's clip-higher uses 0.28)", low=0.0),
        "dual_clip": HParam(0.0, "dual-clip bound c > 1 for negative advantages (0 = off)", low=0.0),
        "level": HParam("token", "token ratio (PPO) or GSPO's sequence ratio", choices=("token", "sequence")),
    },
)
def ppo_clip(
    batch: PolicyBatch,
    state: dict[str, torch.Tensor],
    *,
    eps_low: float,
    eps_high: float,
    dual_clip: float,
    level: str,
    aggregation: str,
) -> LossOutput:
    """PPO's clipped surrogate, per token or with GSPO's sequence ratio.

    ρ_t = π_θ(y_t)/π_old(y_t). `level="sequence"`: every token of y_i uses GSPO's
    s_i = exp((1/|y_i|) Σ_t log ρ_t) — written as GSPO-token's sg[s_i]·π_θ(y_t)/sg[π_θ(y_t)], whose
    value is s_i and whose gradient is s_i ∇log π_θ(y_t); with `seq_mean_token_mean` this is GSPO's
    objective and gradient exactly (the paper's ε is ~3e-4 to 4e-4). Dual clip (c > 1) bounds the
    loss of a negative advantage by −c·A, however large ρ grows.
    """
    if 0 < dual_clip <= 1:
        raise ConfigError(f"loss 'ppo_clip': dual_clip = {dual_clip} must be 0 (off) or > 1")
    log_ratio = _log_ratio(batch)
    if level == "sequence":
        seq = _seq_mean(log_ratio, batch).detach()[:, None]
        log_ratio = seq + log_ratio - log_ratio.detach()
    ratio = safe_exp(log_ratio)
    adv = batch.token_advantages()
    unclipped = -ratio * adv
    clipped = -ratio.clamp(1 - eps_low, 1 + eps_high) * adv
    per_token = torch.maximum(unclipped, clipped)
    if dual_clip > 0:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -dual_clip * adv), per_token)
    is_clipped = (clipped > unclipped).float()
    metrics = {
        "clip_fraction": _seq_mean(is_clipped, batch),
        "ratio_mean": _seq_mean(ratio.detach(), batch),
    }
    return LossOutput(aggregate(per_token, batch, aggregation), {k: v.detach() for k, v in metrics.items()})


def kl_tokens(policy: torch.Tensor, ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from samples of π_θ (Schulman 2020, "Approximating KL
    Divergence"): with r = log π_ref − log π_θ, k1 = −r, k2 = r²/2, k3 = exp(r) − r − 1 (unbiased and
    ≥ 0; GRPO's choice, DeepSeekMath eq. 4)."""
    r = ref.float() - policy.float()
    if estimator == "k1":
        return -r
    if estimator == "k2":
        return 0.5 * r * r
    if estimator == "k3":
        return safe_exp(r) - r - 1
    raise ConfigError(f"unknown KL estimator '{estimator}' (known: k1, k2, k3)")


@register_policy(
    "kl",
    paper="Schulman 2020, Approximating KL Divergence (k1, k2, k3); Shao et al. 2024, DeepSeekMath eq. 4",
    equation="l_t = k(log π_ref − log π_θ): k1 = −r, k2 = r²/2, k3 = e^r − r − 1",
    hparams={"estimator": HParam("k3", "KL estimator", choices=("k1", "k2", "k3"))},
)
def kl(batch: PolicyBatch, state: dict[str, torch.Tensor], *, estimator: str, aggregation: str) -> LossOutput:
    """KL to the reference as a loss term (GRPO puts k3 in the loss, weighted by β)."""
    if batch.ref_token_logps is None:
        raise ConfigError("loss 'kl' needs reference log-probs (PolicyBatch.ref_token_logps is None)")
    per_token = kl_tokens(
        batch.masked(batch.policy_token_logps), batch.masked(batch.ref_token_logps), estimator
    )
    return LossOutput(aggregate(per_token, batch, aggregation), {"kl": _seq_mean(per_token.detach(), batch)})


@register_policy(
    "value",
    paper="Schulman et al. 2017, PPO eq. 9 (value term); Ouyang et al. 2022 / TRL's PPOTrainer (clipped value)",
    equation="l_t = c_v · ½ max((V_t − R_t)², (clip(V_t, V_old ± ε_v) − R_t)²)",
    hparams={
        "vf_coef": HParam(0.1, "value loss coefficient c_v (TRL's vf_coef)", low=0.0),
        "cliprange_value": HParam(
            0.2, "clip of V around the rollout's values (TRL's cliprange_value)", low=0.0
        ),
    },
)
def value(
    batch: PolicyBatch,
    state: dict[str, torch.Tensor],
    *,
    vf_coef: float,
    cliprange_value: float,
    aggregation: str,
) -> LossOutput:
    """PPO's clipped value loss on the value head's V_t, regressed onto the returns R_t = Â_t + V_old,t
    (GAE's targets). The clip keeps V within ε_v of the values the advantages were computed with, as
    TRL's PPOTrainer does; with a token-mean aggregation this is TRL's `vf_coef · vf_loss`."""
    if batch.values is None or batch.old_values is None or batch.returns is None:
        raise ConfigError(
            "loss 'value' needs the value head's values, the rollout's values and the returns: use it with "
            "the estimator 'gae' (methods ppo, ma_ppo, rto)"
        )
    v = batch.masked(batch.values)
    old, ret = batch.masked(batch.old_values), batch.masked(batch.returns)
    clipped = old + (v - old).clamp(-cliprange_value, cliprange_value)
    per_token = vf_coef * 0.5 * torch.maximum((v - ret) ** 2, (clipped - ret) ** 2)
    metrics = {
        "value_mean": _seq_mean(v.detach(), batch),
        "value_clip_fraction": _seq_mean(((clipped - ret) ** 2 > (v - ret) ** 2).float(), batch),
    }
    return LossOutput(aggregate(per_token, batch, aggregation), metrics)


def kl_penalty(
    policy_token_logps: torch.Tensor,
    ref_token_logps: torch.Tensor,
    mask: torch.Tensor,
    *,
    beta: float,
    estimator: str = "k1",
    per_token: bool = True,
) -> torch.Tensor:
    """The KL as a reward penalty −β·k (detached): [N, T] per token (ReMax, REINFORCE++: pass it as
    `token_rewards=`), or with `per_token=False` summed over each response, [N] (RLOO adds −β·Σ_t k1
    to the sequence reward)."""
    keep = mask.bool()
    k = kl_tokens(policy_token_logps.detach(), ref_token_logps.detach(), estimator)
    penalty = torch.where(keep, -beta * k, torch.zeros((), device=k.device))
    return penalty if per_token else penalty.sum(dim=1)


def global_denominators(
    terms: Sequence[tuple[LossSpec, float, dict[str, Any]]], batches: Sequence[PolicyBatch]
) -> list[float]:
    """Each term's global denominator over `batches` (all micro-batches of all ranks); at least 1."""
    return [max(sum(local_denominator(b, h["aggregation"]) for b in batches), 1.0) for _, _, h in terms]


def policy_objective(
    batch: PolicyBatch,
    terms: Sequence[tuple[LossSpec, float, dict[str, Any]]],
    denominators: Sequence[float],
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """This micro-batch's share Σ_term w · Σ_i numerator_i / denominator of the global objective
    (backward it, sum gradients over micro-batches and ranks), and each term's share `loss/NAME`."""
    total = batch.policy_token_logps.new_zeros((), dtype=torch.float32)
    parts: dict[str, torch.Tensor] = {}
    for (spec, weight, hparams), denom in zip(terms, denominators):
        out = spec.fn(batch, {}, **hparams)
        term = out.losses.float().sum() / denom
        parts[f"loss/{spec.name}"] = term.detach()
        total = total + weight * term
    return total, parts
