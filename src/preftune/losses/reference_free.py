"""Reference-free pairwise losses: SimPO and ORPO score responses by the policy's own per-token
log-likelihood ℓ(y) = logp_θ(y)/|y|; no reference model is loaded."""

from __future__ import annotations

import torch

from preftune.losses.core import finish, lengths, log_sigmoid, pair_metrics, policy_logps, valid_examples
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
