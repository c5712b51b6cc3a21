"""Pairwise losses that add a term to DPO: a length-desensitised log-likelihood (LD-DPO), an SFT
regulariser (RPO), margins from other objectives (MODPO)."""

from __future__ import annotations

import torch

from preftune.errors import ConfigError
from preftune.losses.core import (
    branch_mask,
    clean,
    finish,
    lengths,
    log_sigmoid,
    pair_metrics,
    policy_logps,
    ref_logps,
)
from preftune.losses.pairwise_losses import BETA, pair_log_ratios
from preftune.losses.registry import HParam, LossOutput, register
from preftune.types import PreferenceBatch


def desensitised_logps(
    logps: torch.Tensor, token_logps: torch.Tensor, n: torch.Tensor, alpha: float
) -> torch.Tensor:
    """LD-DPO's log-likelihood of a pair: Σ_{t≤k} log π + α Σ_{t>k} log π, k = min(|y_w|, |y_l|).

    logps [E, 2] summed log-probs, token_logps [E, 2, T] (zero-padded), n [E, 2] lengths. Written as
    α·logp + (1 − α)·Σ_{t≤k}, so α = 1 returns `logps` exactly (LD-DPO(α=1) = DPO).
    """
    k = n.min(dim=1).values  # [E]
    t = torch.arange(token_logps.shape[-1], device=token_logps.device)
    public = (t[None, None, :] < k[:, None, None]) & (t[None, None, :] < n[:, :, None])  # [E, 2, T]
    prefix = torch.where(public, token_logps.float(), torch.zeros((), device=token_logps.device)).sum(-1)
    return alpha * logps + (1.0 - alpha) * prefix


@register(
    "ld_dpo",
    kind="pairwise",
    needs_reference=True,
    needs_token_logps=True,
    hparams={
        "beta": BETA,
        "alpha": HParam(
            0.5, "α, weight of the tokens beyond the shorter response's length", low=0.0, high=1.0
        ),
    },
    paper="Liu et al. 2024, Length Desensitization in Direct Preference Optimization (LD-DPO)",
    equation="§4, the desensitised likelihood p̂ (eq. number not verified offline)",
)
def ld_dpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, alpha: float
) -> LossOutput:
    """LD-DPO: DPO on ℓ(y) = Σ_{t≤k} log π(y_t) + α Σ_{t>k} log π(y_t), k = min(|y_w|, |y_l|).

    Applied to policy and reference alike. The paper tunes α per model (§5); 0.5 is a middle value,
    not a paper default. α = 1 is DPO; α = 0 compares the two responses' common-length prefixes only.
    """
    _, _, valid = pair_log_ratios(batch, "ld_dpo")
    if batch.policy_token_logps is None or batch.ref_token_logps is None:
        raise ConfigError(
            "loss 'ld_dpo' needs per-token log-probs of policy and reference (token_logps=True)"
        )
    mask = branch_mask(batch)[:, :2]
    n = clean(batch.lengths[:, :2], mask).long()
    pol_tok, ref_tok = clean(batch.policy_token_logps[:, :2], mask), clean(batch.ref_token_logps[:, :2], mask)
    pol = desensitised_logps(policy_logps(batch)[:, :2], pol_tok, n, alpha)
    ref = desensitised_logps(ref_logps(batch, "ld_dpo")[:, :2], ref_tok, n, alpha)
    rho = pol - ref
    losses = -log_sigmoid(beta * (rho[:, 0] - rho[:, 1]))
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho[:, 0], beta * rho[:, 1]))
    return LossOutput(losses, metrics, {})


@register(
    "rpo",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": BETA,
        "sft_weight": HParam(1.0, "η (paper) / λ, weight of the SFT term", low=0.0),
        "sft_form": HParam(
            "paper",
            "paper: η·β·NLL(y_w) summed over tokens (Liu et al.); token_mean: λ·NLL(y_w)/|y_w| "
            "(ALGORITHMS.md, Pang et al. 2024, TRL rpo_alpha)",
            choices=("paper", "token_mean"),
        ),
    },
    paper="Liu et al. 2024, Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly "
    "an Adversarial Regularizer (RPO, NeurIPS)",
    equation="§4, RPO objective (Algorithm 2): η·β·E[−log π_θ(y_w|x)] + L_DPO",
)
def rpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, sft_weight: float, sft_form: str
) -> LossOutput:
    """RPO: −log σ(βh) + η·β·(−logp_θ(y_w)), the SFT term an adversarial regulariser.

    Liu et al. 2024 (§4, Algorithm 2): the SFT term's coefficient is η·β and it is the *summed*
    negative log-likelihood of the chosen response (its baseline distribution). ALGORITHMS.md's
    `dpo + λ·NLL/|y_w|` (per-token mean, no β) is the Iterative RPO / TRL form; it is available as
    sft_form="token_mean". η = 1 default (not verified against the paper offline).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "rpo")
    nll_w = -clean(batch.policy_logps[:, 0], valid)
    if sft_form == "paper":
        sft_term = sft_weight * beta * nll_w
    else:
        sft_term = sft_weight * nll_w / lengths(batch)[:, 0]
    losses = -log_sigmoid(beta * (rho_w - rho_l)) + sft_term
    metrics = pair_metrics(beta * rho_w, beta * rho_l)
    metrics["rpo/sft_term"] = sft_term.detach()
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})


@register(
    "modpo",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": BETA,
        "weights": HParam(
            (),
            "w = (w₀, w₁..w_M): w₀ weights this preference, w_k the M margin objectives; empty = "
            "equal weights 1/(M+1)",
            low=0.0,
            type="floats",
        ),
    },
    paper="Zhou et al. 2023, Beyond One-Preference-Fits-All Alignment: Multi-Objective Direct "
    "Preference Optimization (MODPO)",
    equation="§3, MODPO loss (eq. number not verified offline)",
)
def modpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, weights: tuple[float, ...]
) -> LossOutput:
    """MODPO: −log σ((β/w₀) h − (1/w₀) Σ_k w_k (m_k(y_w) − m_k(y_l))).

    Zhou et al. 2023: m_k are the margin rewards of the M other objectives, precomputed per response
    (`batch.margins` [E, 2, M]). With no margins (M = 0) and w₀ = 1 it is DPO. β = 0.1 default.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "modpo")
    m_count = 0 if batch.margins is None else batch.margins.shape[-1]
    w = tuple(weights) if weights else (1.0 / (m_count + 1),) * (m_count + 1)
    if len(w) != m_count + 1 or w[0] <= 0:
        raise ConfigError(
            f"loss 'modpo': weights {w} must have 1 + M = {m_count + 1} entries (w₀ > 0, then one per "
            "margin objective)"
        )
    r_w, r_l = beta * rho_w / w[0], beta * rho_l / w[0]
    if batch.margins is not None and m_count:
        wk = torch.tensor(w[1:], dtype=torch.float32, device=rho_w.device)
        m = clean(batch.margins[:, :2], branch_mask(batch)[:, :2])  # [E, 2, M]
        r_w = r_w - (m[:, 0] * wk).sum(-1) / w[0]
        r_l = r_l - (m[:, 1] * wk).sum(-1) / w[0]
    losses = -log_sigmoid(r_w - r_l)
    losses, metrics = finish(losses, valid, pair_metrics(r_w, r_l))
    return LossOutput(losses, metrics, {})
