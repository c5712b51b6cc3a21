"""Reward-model ensembles and reward transforms: aggregators over members, LSC utilities, their sums."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError

AGGREGATORS = ("mean", "min", "uwo", "median")


def aggregate(scores: torch.Tensor, how: str = "mean", *, lam: float = 0.5) -> torch.Tensor:
    """One reward per sample from an ensemble's scores [M members, N samples] → [N].

    mean:   (1/M) Σ_i r_i
    min:    min_i r_i, the worst case (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
            Overoptimization", WCO)
    uwo:    mean − λ·var, var the population variance over members (1/M) Σ_i (r_i − mean)²
            (Coste et al. 2023, uncertainty-weighted optimisation; λ = 0.5 by default)
    median: the middle member; the mean of the two middle ones for even M (Eisenstein et al. 2023)
    """
    if scores.dim() != 2 or scores.shape[0] == 0:
        raise ConfigError(
            f"ensemble scores must be [members, samples] with ≥ 1 member, got {tuple(scores.shape)}"
        )
    if how == "mean":
        return scores.mean(0)
    if how == "min":
        return scores.min(0).values
    if how == "uwo":
        return scores.mean(0) - lam * scores.var(0, unbiased=False)
    if how == "median":
        return scores.quantile(0.5, dim=0)
    raise ConfigError(f"unknown ensemble aggregator '{how}' (known: {', '.join(AGGREGATORS)})")


def reference_score(base_scores: torch.Tensor, quantile: float = 0.5) -> torch.Tensor:
    """r_ref(x): the `quantile` of a reward model's scores on base-policy samples of each prompt.

    base_scores [P prompts, K samples] → [P] (linear interpolation between order statistics)."""
    if not 0.0 <= quantile <= 1.0:
        raise ConfigError(f"LSC reference quantile {quantile} must be in [0, 1]")
    return base_scores.float().quantile(quantile, dim=-1)


def lsc(rewards: torch.Tensor, r_ref: torch.Tensor) -> torch.Tensor:
    """The LSC transform u = log σ(r(x, y) − r_ref(x)) (Wang et al. 2024, "Transforming and Combining
    Rewards for Aligning Large Language Models"): increasing in r, always ≤ 0, and flat once r is well
    above the reference, so a policy gains little from pushing an already good reward higher."""
    return F.logsigmoid(rewards - r_ref)


def summed_utilities(rewards: Sequence[torch.Tensor], refs: Sequence[torch.Tensor]) -> torch.Tensor:
    """Several reward models combined (Wang et al. 2024): Σ_k log σ(r_k(x, y) − r_ref,k(x)), a soft AND
    (the log-probability that every property is better than its reference, independent factors)."""
    if len(rewards) != len(refs) or not rewards:
        raise ConfigError(
            f"summed utilities: {len(rewards)} rewards and {len(refs)} references; give one each"
        )
    return torch.stack([lsc(r, ref) for r, ref in zip(rewards, refs)]).sum(0)
