"""Losses of the online pairwise methods (docs/online.md): CoPG on groups scored by a reward, XPO's
DPO with an exploration bonus. Both also train offline: CoPG on ranked data with scores (the rewards),
XPO on pairs (without a third branch it is DPO).

Notation: ρ = logp_θ − logp_ref, h = ρ_w − ρ_l, r the reward of a response (`batch.scores`).
"""

from __future__ import annotations

import torch

from preftune.errors import ConfigError
from preftune.losses.core import (
    branch_mask,
    clean,
    finish,
    log_ratios,
    log_sigmoid,
    pair_metrics,
    policy_logps,
)
from preftune.losses.listwise_losses import list_metrics
from preftune.losses.pairwise_losses import BETA, pair_log_ratios
from preftune.losses.registry import HParam, LossOutput, register
from preftune.types import PreferenceBatch


@register(
    "copg_loss",
    kind="listwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper="Flet-Berliac et al. 2024, Contrastive Policy Gradient (arXiv:2406.19185); group form as in "
    "Cohere 2025, Command A report §3 (1/(k−1) Σ_{i>j})",
    equation="R_β(y) = r(y) − β ρ(y); l = 1/(K−1) Σ_{i<j} (R_β(y_i) − R_β(y_j))² (CoPG loss, eq. number not verified)",
)
def copg(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """CoPG: 1/(K−1) Σ_{i<j} (R_β(y_i) − R_β(y_j))², R_β(y) = r(y) − β·ρ(y), r = `batch.scores`.

    Flet-Berliac et al. 2024: the squared difference of the KL-regularised rewards of two responses
    of one prompt; its gradient −2β(R_β(y) − R_β(y′))(∇log π_θ(y) − ∇log π_θ(y′)) is a policy gradient
    whose baseline is the other response's regularised reward, which needs no importance ratio, so
    the responses may come from any policy (off-policy). On a pair with r_w − r_l = ½ it is β² times
    IPO's loss (h − 1/(2β))². A group of K responses sums all pairs and divides by K − 1 (Cohere's
    Command A report writes the group form so; on-policy it is RLOO with advantages scaled by 2β).
    The paper's text was not reachable to check its equation number or a ½ in front; this form's
    gradient is the one the paper's analysis states. Order of the responses does not matter.
    """
    if batch.scores is None:
        raise ConfigError(
            "loss 'copg_loss' needs a reward per response (batch.scores): ranked data with scores, or an "
            "online run (preftune train copg)"
        )
    mask = branch_mask(batch)
    present = mask.float().sum(dim=1)
    valid = present >= 2
    implicit = beta * log_ratios(batch, "copg_loss")  # [E, K] β·ρ, the implicit rewards (metrics)
    regularised = clean(batch.scores, mask) - implicit
    k = mask.shape[1]
    upper = torch.triu(torch.ones(k, k, dtype=torch.bool, device=mask.device), diagonal=1)
    both = upper[None] & mask[:, :, None] & mask[:, None, :]
    diff = regularised[:, :, None] - regularised[:, None, :]
    squares = torch.where(both, diff * diff, torch.zeros((), device=diff.device))
    losses = squares.sum(dim=(1, 2)) / (present - 1).clamp(min=1)
    s = clean(batch.scores, mask)
    better = (s[:, :, None] > s[:, None, :]) & mask[:, :, None] & mask[:, None, :]
    losses, metrics = finish(losses, valid, list_metrics(implicit, mask, better))
    return LossOutput(losses, metrics, {})


@register(
    "xpo_loss",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": BETA,
        "alpha": HParam(
            1e-5, "α, weight of the exploration term α·log π_θ(ỹ) (TRL's XPOConfig.alpha)", low=0.0
        ),
    },
    paper="Xie et al. 2024, Exploratory Preference Optimization (arXiv:2405.21046), Alg. 1; TRL XPOTrainer",
    equation="l = −log σ(β h) + α·log π_θ(ỹ), ỹ ~ π_ref (branch 2; absent: DPO)",
)
def xpo(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, alpha: float) -> LossOutput:
    """XPO: DPO's −log σ(βh) plus α·log π_θ(ỹ) for a response ỹ sampled from the reference (branch 2).

    Xie et al. 2024, Alg. 1: the online DPO objective plus the exploration bonus α Σ log π(ỹ);
    minimising it lowers the likelihood of what the reference would say, which pushes the policy to
    explore beyond the reference's support. As TRL's XPOTrainer: the summed log-prob of ỹ, added to
    each pair's DPO loss, α = 1e-5 by default. Pairs without a third branch get DPO alone, so α = 0,
    or offline pairs, are exactly DPO. (TRL pairs one policy sample against ỹ; the `xpo` method of
    `preftune train` pairs the best and worst of G policy samples and keeps ỹ for the bonus.)
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "xpo_loss")
    losses = -log_sigmoid(beta * (rho_w - rho_l))
    metrics = pair_metrics(beta * rho_w, beta * rho_l)
    mask = branch_mask(batch)
    if mask.shape[1] >= 3:
        explore = torch.where(mask[:, 2], policy_logps(batch)[:, 2], torch.zeros((), device=mask.device))
        losses = losses + alpha * explore
        metrics["xpo/logps_explore"] = explore
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})
