"""Pairwise direct-alignment losses (docs/algorithms.md §1): the DPO family on (chosen, rejected) pairs.

Notation: ρ = logp_θ − logp_ref, h = ρ_w − ρ_l. Each function returns per-pair losses [E] and the
metrics rewards/{chosen,rejected,margin,accuracy} (β ρ, or the method's own implicit reward).
"""

from __future__ import annotations

import torch

from preftune.errors import ConfigError
from preftune.losses.core import (
    clean,
    finish,
    lengths,
    log_ratios,
    log_sigmoid,
    pair_metrics,
    valid_examples,
)
from preftune.losses.registry import HParam, LossOutput, register
from preftune.types import PreferenceBatch

BETA = HParam(
    0.1,
    "β, strength of the KL regularisation (inverse temperature of the implicit reward)",
    low=0.0,
    low_open=True,
)


def pair_log_ratios(batch: PreferenceBatch, loss: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ρ_w [E], ρ_l [E], valid [E]) of a pairwise batch, float32."""
    valid = valid_examples(batch, 2)
    rho = log_ratios(batch, loss)
    return rho[:, 0], rho[:, 1], valid


def sigmoid_pair_loss(z: torch.Tensor, p: torch.Tensor | float = 1.0) -> torch.Tensor:
    """−p log σ(z) − (1 − p) log σ(−z): the binary cross-entropy of a Bradley–Terry logit z with soft label p."""
    return -p * log_sigmoid(z) - (1.0 - p) * log_sigmoid(-z)


@register(
    "dpo",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper="Rafailov et al. 2023, Direct Preference Optimization (arXiv:2305.18290)",
    equation="Eq. 7",
)
def dpo(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float = 0.1) -> LossOutput:
    """DPO: −log σ(β h), h = ρ_w − ρ_l.

    Rafailov et al. 2023, Eq. 7 (the equation TRL and OpenRLHF cite for this loss). Default β = 0.1,
    the paper's default ("Unless noted otherwise, we use β = 0.1", App. B; 0.5 for TL;DR).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "dpo")
    losses = -log_sigmoid(beta * (rho_w - rho_l))
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


def _eps(default: float, doc: str) -> HParam:
    return HParam(default, doc, low=0.0, high=0.5, high_open=True)


@register(
    "cdpo",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": BETA,
        "epsilon": _eps(0.1, "ε, label smoothing: assumed probability a label is flipped"),
    },
    paper="Mitchell 2023, A note on DPO with noisy preferences & relationship to IPO (conservative DPO)",
    equation="note, Eq. 3 (as cited by OpenRLHF's and TRL's label-smoothed DPO)",
)
def cdpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, epsilon: float
) -> LossOutput:
    """Conservative DPO: −(1−ε) log σ(βh) − ε log σ(−βh).

    Mitchell 2023 (the cDPO note, Eq. 3 as cited by OpenRLHF): the BCE of DPO's logit against the
    smoothed label 1−ε. TRL 1.16's DPO (`sigmoid`) ignores `label_smoothing` (only its `robust`,
    `exo_pair` and `aot` losses read it), so cDPO has no TRL 1.16 counterpart; earlier TRL releases
    had this form. The note recommends no value; ε = 0.1 here as a moderate assumed flip rate.
    ε = 0 is DPO.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "cdpo")
    losses = sigmoid_pair_loss(beta * (rho_w - rho_l), 1.0 - epsilon)
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "rdpo",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": BETA, "epsilon": _eps(0.1, "ε, known label-flip rate, 0 ≤ ε < ½")},
    paper="Chowdhury et al. 2024, Provably Robust DPO: Aligning Language Models with Noisy Feedback (ICML)",
    equation="§3, the de-biased loss ℓ̂ (eq. number not verified: paper text not reachable)",
)
def rdpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, epsilon: float
) -> LossOutput:
    """Robust DPO: [−(1−ε) log σ(βh) + ε log σ(−βh)] / (1 − 2ε).

    Chowdhury et al. 2024: an unbiased estimate of the clean-label DPO loss when each label is
    flipped with known probability ε (E over flips equals −log σ(βh), tested). The form matches
    TRL's `robust` loss. It can be negative; that is expected. ε = 0.1 default (a moderate assumed
    flip rate; the paper sets ε to the injected flip rate — its exact grid not verified offline).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "rdpo")
    z = beta * (rho_w - rho_l)
    losses = (-(1.0 - epsilon) * log_sigmoid(z) + epsilon * log_sigmoid(-z)) / (1.0 - 2.0 * epsilon)
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "smooth_dpo",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper="Lu et al. 2025, SmPO: Smoothed Preference Optimization (soft preference labels)",
    equation="soft-label BCE of the DPO logit (paper not found offline; form = TRL label smoothing with ε = 1 − p)",
)
def smooth_dpo(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """Smoothed DPO: −p log σ(βh) − (1−p) log σ(−βh), p ∈ [0, 1] per pair from `batch.labels`.

    SmPO (Lu et al. 2025): the soft label p (e.g. a reward model's P(y_w ≻ y_l)) replaces DPO's hard
    label 1. p = 1 is DPO; p = ½ makes the loss minimal at h = 0. The label is data, not a
    hyper-parameter: the functional API takes it as `label=`.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "smooth_dpo")
    if batch.labels is None:
        raise ConfigError(
            "loss 'smooth_dpo' needs a soft label p ∈ [0, 1] per pair (batch.labels / the data's "
            "'label' field); use 'dpo' for hard labels"
        )
    p = clean(batch.labels, valid)
    if bool(((p < 0) | (p > 1)).any()):
        raise ConfigError("loss 'smooth_dpo': soft labels must lie in [0, 1]")
    losses = sigmoid_pair_loss(beta * (rho_w - rho_l), p)
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "ipo",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": HParam(0.1, "β = τ, regularisation; the loss targets h̄ = 1/(2β)", low=0.0, low_open=True),
        "token_mean": HParam(True, "use per-token mean log-ratios ρ/|y| (true) or summed ρ (false)"),
    },
    paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from Human Preferences (IPO)",
    equation="Eq. 17 (empirical IPO loss)",
)
def ipo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, token_mean: bool
) -> LossOutput:
    """IPO: (h̄ − 1/(2β))², h̄ = ρ_w/|y_w| − ρ_l/|y_l| (token_mean) or ρ_w − ρ_l.

    Azar et al. 2023, Eq. 17 with τ = β (the equation TRL's IPO loss cites). The paper writes summed
    log-ratios; the per-token mean (policy and reference log-probs divided by |y|) is what TRL
    applies for IPO, following the DPO repository's discussion of IPO (eric-mitchell/
    direct-preference-optimization issue 40; TRL notes the IPO authors confirmed it); kept as the
    default. The paper gives no LLM default for τ; β = 0.1.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "ipo")
    if token_mean:
        n = lengths(batch)
        rho_w, rho_l = rho_w / n[:, 0], rho_l / n[:, 1]
    losses = (rho_w - rho_l - 1.0 / (2.0 * beta)) ** 2
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "hinge",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper="Liu et al. 2023, Statistical Rejection Sampling Improves Preference Optimization (RSO); SLiC-HF",
    equation="RSO §3, hinge-norm loss (eq. number not verified offline)",
)
def hinge(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """Hinge (SLiC / RSO hinge-norm): max(0, 1 − βh).

    RSO's normalised hinge loss (SLiC-HF's calibration loss with the SFT policy as normaliser).
    β = 0.1 default (as DPO; RSO sweeps γ = β).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "hinge")
    losses = torch.relu(1.0 - beta * (rho_w - rho_l))
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "dpo_norm",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": HParam(5.0, "β on per-token log-ratios", low=0.0, low_open=True)},
    paper="Lambert et al. 2024, Tülu 3: Pushing Frontiers in Open Language Model Post-Training",
    equation="§5 length-normalised DPO (eq. number not verified offline)",
)
def dpo_norm(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """Length-normalised DPO: −log σ(β (ρ_w/|y_w| − ρ_l/|y_l|)).

    Tülu 3's preference-tuning objective; β = 5 is Tülu 3's setting for it (per-token log-ratios are
    ~|y| times smaller than summed ones, hence the larger β).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "dpo_norm")
    n = lengths(batch)
    r_w, r_l = beta * rho_w / n[:, 0], beta * rho_l / n[:, 1]
    losses = -log_sigmoid(r_w - r_l)
    losses, metrics = finish(losses, valid, pair_metrics(r_w, r_l))
    return LossOutput(losses, metrics, {})
