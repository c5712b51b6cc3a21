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
        "desensitise_reference": HParam(
            True,
            "also desensitise the reference log-prob (ρ = 0 at π_θ = π_ref; TRL 1.16's ld_alpha does "
            "too); false = policy only, as older TRL releases",
        ),
    },
    paper="Liu et al. 2024, Length Desensitization in Direct Preference Optimization (LD-DPO)",
    equation="§4, the desensitised likelihood p̂ with public length l_p (eq. number not verified: "
    "paper text not reachable)",
)
def ld_dpo(
    batch: PreferenceBatch,
    state: dict[str, torch.Tensor],
    *,
    beta: float,
    alpha: float,
    desensitise_reference: bool,
) -> LossOutput:
    """LD-DPO: DPO with logp_θ(y) replaced by Σ_{t≤l_p} log π_θ(y_t) + α Σ_{t>l_p} log π_θ(y_t).

    l_p = min(|y_w|, |y_l|), the pair's "public length". The split at l_p matches TRL's ld_alpha
    implementation; the paper's text was not reachable offline. TRL 1.16 desensitises the policy
    *and* the reference log-probs (shared + ld_alpha·tail for both, dpo_trainer.py), as here by
    default (ρ = 0 at π_θ = π_ref, as the trainer's invariants expect; tested against TRL's
    expression); desensitise_reference=false gives the policy-only form of older TRL releases
    (ρ ≠ 0 at π_θ = π_ref when the lengths differ). The paper tunes α per model (its reviewers
    note a different α for every model; TRL: "between 0 and 1"); 0.5 is a middle value, not a
    paper default. α = 1 is DPO either way; α = 0 keeps only the common-length prefixes.
    """
    _, _, valid = pair_log_ratios(batch, "ld_dpo")
    if batch.policy_token_logps is None or (desensitise_reference and batch.ref_token_logps is None):
        raise ConfigError(
            "loss 'ld_dpo' needs per-token log-probs of the policy (and of the reference with "
            "desensitise_reference) (token_logps=True)"
        )
    mask = branch_mask(batch)[:, :2]
    n = clean(batch.lengths[:, :2], mask).long()
    pol_tok = clean(batch.policy_token_logps[:, :2], mask)
    pol = desensitised_logps(policy_logps(batch)[:, :2], pol_tok, n, alpha)
    ref = ref_logps(batch, "ld_dpo")[:, :2]
    if desensitise_reference and batch.ref_token_logps is not None:
        ref = desensitised_logps(ref, clean(batch.ref_token_logps[:, :2], mask), n, alpha)
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
        "sft_weight": HParam(
            0.005,
            "η (paper) / λ, weight of the SFT term; 0.005 is the paper's (§6, App. D.1, with β = "
            "0.01 / 0.05); token_mean runs used 0.2 (authors' OpenRLHF script) or 1 (Pang et al.)",
            low=0.0,
        ),
        "sft_form": HParam(
            "paper",
            "paper: η·β·NLL(y_w) summed over tokens (Liu et al. Eq. 4.8); token_mean: λ·NLL(y_w)/|y_w| "
            "per example (the authors' averaged variant; Pang et al. 2024)",
            choices=("paper", "token_mean"),
        ),
    },
    paper="Liu et al. 2024, Provably Mitigating Overoptimization in RLHF: Your SFT Loss is Implicitly "
    "an Adversarial Regularizer (RPO, NeurIPS)",
    equation="Eq. 4.8 (Algorithm 2): L_RPO = η·β·E[−log π_θ(y_w|x)] + L_DPO",
)
def rpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, sft_weight: float, sft_form: str
) -> LossOutput:
    """RPO: −log σ(βh) + η·β·(−logp_θ(y_w)), the SFT term an adversarial regulariser.

    Liu et al. 2024, Eq. 4.8 (Algorithm 2): the SFT term's coefficient is η·β and it is the *summed*
    negative log-likelihood of a baseline response, in practice the chosen one (§6). Checked against
    the arXiv HTML text and the authors' code (alignment-handbook rpo_trainer: loss −= β·η·logp_w,
    summed log-probs). η = 0.005 default: the paper's value for both its model series (§6, App. D.1,
    with β = 0.01 and 0.05). sft_form="token_mean" is `dpo + λ·NLL(y_w)/|y_w|`, each example's
    per-token mean (no β): the authors' "average SFT loss" variant (their OpenRLHF script: η = 0.2,
    β = 0.5) and Iterative RPO's (Pang et al. 2024, λ = 1) — set sft_weight for it. It is *not*
    TRL's form: TRL 1.16 (loss_type ["sigmoid", "sft"] with loss_weights [1, λ]; its rpo_alpha is
    gone) averages the NLL over all chosen tokens of the batch, so long responses weigh more; the
    objective `dpo:1,sft:λ` reproduces that exactly (global token count).
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
    equation="§3, MODPO loss (form checked against the authors' modpo_trainer; eq. number not verified)",
)
def modpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, weights: tuple[float, ...]
) -> LossOutput:
    """MODPO: −log σ((β/w₀) h − (1/w₀) Σ_k w_k (m_k(y_w) − m_k(y_l))).

    Zhou et al. 2023: m_k are the margin rewards of the M other objectives, precomputed per response
    (`batch.margins` [E, 2, M]). Same form as the authors' code (ZHZisZZ/modpo modpo_trainer:
    r = (1/w₀)(β ρ − m·w₁:)). With no margins (M = 0) and w₀ = 1 it is DPO. β = 0.1 default; the
    authors require w explicitly — equal weights 1/(M+1) when none are given is ours.
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
