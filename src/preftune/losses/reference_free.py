"""Reference-free pairwise losses: SimPO, ORPO, CPO and AlphaPO score responses by the policy's own
log-likelihood (per token, ℓ(y) = logp_θ(y)/|y|, or summed for CPO); no reference model is loaded."""

from __future__ import annotations

import torch

from preftune.losses.core import (
    finish,
    lengths,
    log_sigmoid,
    pair_metrics,
    policy_logps,
    safe_expm1,
    valid_examples,
)
from preftune.losses.registry import HParam, LossOutput, register
from preftune.types import PreferenceBatch

# log(1 − e^ℓ) is −inf at ℓ = 0 (a response with probability 1); keep ℓ a hair below 0 so the log-odds
# and their gradients stay finite. Real per-token log-likelihoods are far below this.
MAX_MEAN_LOGP = -1e-6


def mean_logps(batch: PreferenceBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ℓ_w [E], ℓ_l [E], valid [E]): per-token mean policy log-likelihoods of a pair, float32."""
    valid = valid_examples(batch, 2)
    ell = policy_logps(batch)[:, :2] / lengths(batch)[:, :2]
    return ell[:, 0], ell[:, 1], valid


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 − e^x) for x < 0, stable (Mächler 2012): log(−expm1(x)) near 0, log1p(−e^x) below −log 2."""
    x = x.clamp(max=MAX_MEAN_LOGP)
    near = x > -0.6931471805599453
    return torch.where(
        near,
        torch.log(-torch.expm1(torch.where(near, x, -1.0))),
        torch.log1p(-torch.exp(torch.where(near, -1.0, x))),
    )


@register(
    "simpo",
    kind="pairwise",
    needs_reference=False,
    hparams={
        "beta": HParam(2.0, "β, scale of the length-normalised reward β·logp/|y|", low=0.0, low_open=True),
        "gamma": HParam(
            1.0, "γ, target reward margin (absolute, as Eq. 6; the authors' γ/β ratio times β)", low=0.0
        ),
    },
    paper="Meng et al. 2024, SimPO: Simple Preference Optimization with a Reference-Free Reward (NeurIPS)",
    equation="Eq. 6",
)
def simpo(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, gamma: float) -> LossOutput:
    """SimPO: −log σ(β ℓ_w − β ℓ_l − γ), ℓ = logp_θ(y)/|y|; no reference.

    Meng et al. 2024, Eq. 6 (Eq. 5 is the margin Bradley–Terry model). γ is the paper's absolute
    margin, not the authors' later `gamma_beta_ratio` = γ/β (their code computes γ = ratio·β).
    Defaults β = 2.0, γ = 1.0, i.e. γ/β = 0.5, the authors' recommended starting ratio (README);
    their released settings are β ∈ {2.0, 2.5}, γ/β ∈ {0.1, 0.5, 0.55, 0.8} (Mistral-Base: β = 2,
    γ = 1.6). Checked against the authors' repository (princeton-nlp/SimPO). Rewards metrics are
    SimPO's implicit reward β ℓ.
    """
    ell_w, ell_l, valid = mean_logps(batch)
    losses = -log_sigmoid(beta * (ell_w - ell_l) - gamma)
    losses, metrics = finish(losses, valid, pair_metrics(beta * ell_w, beta * ell_l))
    return LossOutput(losses, metrics, {})


@register(
    "orpo",
    kind="pairwise",
    needs_reference=False,
    hparams={"odds_ratio_weight": HParam(0.1, "λ, weight of the odds-ratio term", low=0.0)},
    paper="Hong et al. 2024, ORPO: Monolithic Preference Optimization without Reference Model (EMNLP)",
    equation="Eq. 6 (L_SFT + λ L_OR), Eq. 7 (L_OR)",
)
def orpo(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, odds_ratio_weight: float) -> LossOutput:
    """ORPO: −ℓ_w − λ log σ(log odds(y_w) − log odds(y_l)), log odds(y) = ℓ − log(1 − e^ℓ).

    Hong et al. 2024, Eq. 6 (L_SFT + λ·L_OR), Eq. 7 (L_OR), odds from Eq. 4 with ℓ = logp_θ(y)/|y|
    (the paper's length-normalised likelihood); the log-odds formula matches TRL's ORPO loss ("Eqs.
    (4) and (7)"). The SFT part is the per-token NLL of y_w's *response* tokens, *per example*.
    The reference implementations differ in two ways: TRL's (experimental/orpo, "computed over the
    full prompt and response") and the authors' take the causal-LM loss over the prompt tokens
    too, averaged over all chosen tokens of the batch (long rows weigh more). Prompt tokens never
    count here; add an `sft` term for the batch-token-mean form (over response tokens).
    λ = 0.1 (TRL's ORPO default for the paper's λ). Reward metrics are the log odds.
    """
    ell_w, ell_l, valid = mean_logps(batch)
    odds_w, odds_l = ell_w - log1mexp(ell_w), ell_l - log1mexp(ell_l)
    ratio_term = -log_sigmoid(odds_w - odds_l)
    losses = -ell_w + odds_ratio_weight * ratio_term
    metrics = pair_metrics(odds_w, odds_l)
    metrics["orpo/log_odds_ratio"] = (odds_w - odds_l).detach()
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})


@register(
    "cpo",
    kind="pairwise",
    needs_reference=False,
    hparams={
        "beta": HParam(0.1, "β, scale of the log-likelihood margin", low=0.0, low_open=True),
        "cpo_alpha": HParam(
            1.0, "weight of the NLL (behaviour cloning) term on y_w (TRL's cpo_alpha)", low=0.0
        ),
    },
    paper="Xu et al. 2024, Contrastive Preference Optimization: Pushing the Boundaries of LLM Performance "
    "in Machine Translation (CPO, ICML; arXiv:2401.08417)",
    equation="Eq. 3 (L_prefer, the number TRL's cpo_trainer cites) + the NLL term L_NLL (L_CPO = L_prefer + L_NLL)",
)
def cpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, cpo_alpha: float
) -> LossOutput:
    """CPO: −log σ(β logp_θ(y_w) − β logp_θ(y_l)) − cpo_alpha·ℓ_w; no reference.

    Xu et al. 2024: DPO's loss with a uniform reference (dropped), plus a negative log-likelihood
    term on the preferred response that keeps the policy near the preferred data (Eq. 3 is
    L_prefer). Summed log-probs in the margin, as the paper and TRL's CPO (`loss_type="sigmoid"`).
    The NLL term here is the per-token NLL of y_w *per example* (response tokens only, like
    `orpo`); TRL's is the causal-LM loss averaged over all chosen response tokens of the batch —
    `cpo:1,sft:A` with cpo_alpha=0 reproduces that exactly (tested). Defaults β = 0.1,
    cpo_alpha = 1 (TRL's CPOConfig). Reward metrics are β logp_θ(y).
    """
    valid = valid_examples(batch, 2)
    logp = policy_logps(batch)[:, :2]
    ell_w = logp[:, 0] / lengths(batch)[:, 0]
    losses = -log_sigmoid(beta * (logp[:, 0] - logp[:, 1])) - cpo_alpha * ell_w
    metrics = pair_metrics(beta * logp[:, 0], beta * logp[:, 1])
    metrics["cpo/nll_per_token"] = -ell_w.detach()
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})


@register(
    "alphapo",
    kind="pairwise",
    needs_reference=False,
    hparams={
        "beta": HParam(2.0, "β, scale of the reward (as SimPO)", low=0.0, low_open=True),
        "gamma": HParam(1.0, "γ, target reward margin (absolute, as SimPO)", low=0.0),
        "alpha": HParam(0.25, "α, shape of the reward (1 − p^{−α})/α; α → 0 is SimPO", low=-1.0, high=1.0),
    },
    paper="Gupta et al. 2025, AlphaPO: Reward Shape Matters for LLM Alignment (ICML; arXiv:2501.03884)",
    equation="§3, AlphaPO reward r_α = (β/α)(1 − p^{−α}), p = π_θ(y|x)^{1/|y|} (eq. number not verified offline)",
)
def alphapo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, gamma: float, alpha: float
) -> LossOutput:
    """AlphaPO: −log σ(β r(y_w) − β r(y_l) − γ), r(y) = (1 − e^{−αℓ})/α, ℓ = logp_θ(y)/|y|; no reference.

    Gupta et al. 2025: SimPO with the reward reshaped by α (the length-normalised α-divergence
    reward of f-DPO); α → 0 gives SimPO exactly, larger α lowers the chosen likelihood less
    (likelihood displacement). r is computed as −expm1(−αℓ)/α, with exp continued linearly above
    exponent 40 (finite for very unlikely responses). Same expression as TRL 1.16's CPO with
    `loss_type="alphapo"` (simpo margin γ/β, cpo_alpha = 0; tested). β = 2, γ = 1 as our `simpo`;
    α = 0.25 is a middle value of the positive range the paper recommends (its per-model grid not
    verified offline). Reward metrics are β r(y).
    """
    ell_w, ell_l, valid = mean_logps(batch)
    if alpha == 0.0:
        r_w, r_l = ell_w, ell_l
    else:
        r_w, r_l = -safe_expm1(-alpha * ell_w) / alpha, -safe_expm1(-alpha * ell_l) / alpha
    losses = -log_sigmoid(beta * (r_w - r_l) - gamma)
    losses, metrics = finish(losses, valid, pair_metrics(beta * r_w, beta * r_l))
    return LossOutput(losses, metrics, {})
