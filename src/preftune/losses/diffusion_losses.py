"""Losses that exist only for diffusion models (docs/diffusion.md): Diffusion-KTO, MaPO, SmPO, InPO,
SePPO, PSO.

They read the same `PreferenceBatch` as every loss, filled by the diffusion seam
(`preftune.diffusion.denoising_stats`): the "log-prob" of an image is the implicit statistic
logp = −½·mse(ε_θ(x_t, t, c), target), mse the mean over latent elements, so ρ = logp_θ − logp_ref =
−½ (mse_θ − mse_ref) and mse = −2·logp. Diffusion-DPO, its hinge and IPO variants and DCPO need no
new loss: they are `dpo`, `hinge`, `ipo` on these statistics (β in the papers' units).
"""

from __future__ import annotations

import torch

from preftune.errors import ConfigError
from preftune.losses.core import (
    clean,
    finish,
    log_ratios,
    log_sigmoid,
    pair_metrics,
    policy_logps,
    valid_examples,
)
from preftune.losses.pairwise_losses import pair_log_ratios
from preftune.losses.registry import HParam, LossOutput, register
from preftune.losses.unpaired_losses import ReferencePoint
from preftune.types import PreferenceBatch

# Diffusion-KTO's z = max(0, mean g) over the images of the global batch, g = −(mse_θ − mse_ref) = 2ρ
DIFF_KTO_POINT = ReferencePoint("diff_kto", branch=0, total_key="g_sum", state_key="z", scale=2.0)


@register(
    "diff_kto",
    kind="unpaired",
    needs_reference=True,
    batch_statistic=DIFF_KTO_POINT.statistic,
    hparams={
        "beta": HParam(1000.0, "β on g = −(mse_θ − mse_ref) (paper units)", low=0.0, low_open=True),
        "desirable_weight": HParam(1.0, "λ_D, weight of liked images", low=0.0),
        "undesirable_weight": HParam(1.0, "λ_U, weight of disliked images", low=0.0),
    },
    paper="Li et al. 2024, Aligning Diffusion Models by Optimizing Human Utility (Diffusion-KTO, "
    "arXiv:2404.04465)",
    equation="Eq. 8 with the sigmoid utility; g = −(mse_θ − mse_ref), z = max(0, mean g)",
)
def diffusion_kto(
    batch: PreferenceBatch,
    state: dict[str, torch.Tensor],
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> LossOutput:
    """Diffusion-KTO: λ_y (1 − σ(β · sign(y) · (g − z))), g = −(mse_θ − mse_ref) = 2ρ.

    Li et al. 2024, Eq. 8 with the sigmoid value function, as the official training script computes
    it: g per image, z = the detached mean of g over the *global* batch (all ranks), clamped at 0 —
    no mismatched completions as in language KTO. The trainer passes z of the whole step as
    `state["z"]`; called without it, z comes from this batch. Labels: 1 liked, 0 disliked.
    Defaults from the official script: β = 1000, λ_D = λ_U = 1.
    """
    if batch.labels is None:
        raise ConfigError("loss 'diff_kto' needs a 0/1 label per image (batch.labels)")
    valid = valid_examples(batch, 1)
    g = 2.0 * log_ratios(batch, "diff_kto")[:, 0]
    z = DIFF_KTO_POINT.value(batch, state)
    desirable = clean(batch.labels, valid) > 0.5
    sign = torch.where(desirable, 1.0, -1.0)
    weight = torch.where(desirable, desirable_weight, undesirable_weight)
    losses = weight * (1.0 - torch.sigmoid(sign * beta * (g - z)))
    metrics = {
        "rewards/implicit": beta * g,
        "rewards/accuracy": (sign * (g - z) > 0).float(),
        "kto/z0": z.expand_as(g),
    }
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})


def mapo_f(x: torch.Tensor) -> torch.Tensor:
    """f(x) = x / (eˣ − 1), f(0) = 1, computed without overflow for large x (→ x·e⁻ˣ)."""
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    pos = safe > 0
    # x > 0: x e^{-x} / (1 − e^{-x}); x < 0: x / (e^x − 1). Both finite for any |x|.
    neg_x = torch.where(pos, -safe, safe)
    value = torch.where(pos, safe * torch.exp(neg_x) / -torch.expm1(neg_x), safe / torch.expm1(neg_x))
    return torch.where(small, 1.0 - x / 2.0, value)


@register(
    "mapo",
    kind="pairwise",
    needs_reference=False,
    hparams={
        "beta": HParam(0.1, "β, weight of the margin term", low=0.0, low_open=True),
        "snr": HParam(0.5, "s in f(ℓ) = sℓ/(exp(sℓ) − 1)", low=0.0, low_open=True),
        "timesteps": HParam(1000, "T, the scheduler's training timesteps (scales the margin)", low=1),
    },
    paper="Hong et al. 2024, Margin-aware Preference Optimization for Aligning Diffusion Models "
    "without Reference (MaPO, arXiv:2406.06424)",
    equation="§3 MaPO objective: mse^w − β log σ(T·(f(mse^w) − f(mse^l))), f(ℓ) = sℓ/(e^{sℓ} − 1)",
)
def mapo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, snr: float, timesteps: int
) -> LossOutput:
    """MaPO (reference-free): mse^w − β log σ(T·m), m = f(mse^w) − f(mse^l), f(ℓ) = sℓ/(e^{sℓ} − 1).

    Hong et al. 2024; the official code computes f on the per-image mean-squared errors and returns
    mean(mse^w) − β·mean(log σ(T m)), which is the mean of these per-pair losses. mse = −2·logp
    (the seam's statistic). Defaults of the official code: s = 0.5, β = 0.1, T = 1000.
    """
    valid = valid_examples(batch, 2)
    mse = -2.0 * policy_logps(batch)
    f = mapo_f(snr * mse)
    margin = f[:, 0] - f[:, 1]
    losses = mse[:, 0] - beta * log_sigmoid(timesteps * margin)
    losses, metrics = finish(losses, valid, pair_metrics(f[:, 0], f[:, 1]))
    return LossOutput(losses, metrics, {})


def smpo_label(score_w: torch.Tensor, score_l: torch.Tensor) -> torch.Tensor:
    """p = softmax(s_w, s_l)_w = σ(s_w − s_l): SmPO's smoothed preference from two (normalised) scores."""
    return torch.sigmoid(score_w.float() - score_l.float())


@register(
    "smpo",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": HParam(2000.0, "β (paper units, as InPO)", low=0.0, low_open=True),
        "label_scale": HParam(10.0, "multiplier of the centred label 2p − 1", low=0.0, low_open=True),
    },
    paper="Lu et al. 2025, Smoothed Preference Optimization via ReNoise Inversion for Aligning "
    "Diffusion Models with Varied Human Preferences (SmPO, ICML, arXiv:2506.02698)",
    equation="Diffusion-DPO logit scaled by the smoothed label: −log σ(label_scale·(2p − 1)·β·h)",
)
def smpo(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, label_scale: float
) -> LossOutput:
    """SmPO's smoothed-label loss: −log σ(c·(2p − 1)·β·h), h = ρ_w − ρ_l = −½·d.

    In Diffusion-DPO units the logit is −β/2 · (2p − 1) · c · d (d the mse difference of
    differences), c = 10: a near-tie (p ≈ ½) contributes almost nothing, p = 0.55 gives plain
    Diffusion-DPO. p per pair comes from `batch.labels` (see `smpo_label`). Unlike `smooth_dpo` (the
    binary cross-entropy against a soft label), the label scales the logit here. SmPO's other half
    — x_t from ReNoise inversion instead of forward noise — is how the statistics are made, not
    part of this loss. β = 2000 (InPO's default, which SmPO keeps). Metrics: rewards = ρ (unscaled).
    """
    if batch.labels is None:
        raise ConfigError("loss 'smpo' needs a smoothed label p ∈ [0, 1] per pair (batch.labels)")
    rho_w, rho_l, valid = pair_log_ratios(batch, "smpo")
    p = clean(batch.labels, valid)
    losses = -log_sigmoid(label_scale * (2.0 * p - 1.0) * beta * (rho_w - rho_l))
    # rewards are ρ itself: β·ρ at β = 2000 would magnify float32 noise of ρ ≈ 0 to ~1e-3
    losses, metrics = finish(losses, valid, pair_metrics(rho_w, rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "inpo",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": HParam(2000.0, "β (paper units, on −½·mse statistics)", low=0.0, low_open=True),
        "inversion_steps": HParam(10, "DDIM inverse steps over the whole schedule (x_t is inverted)", low=1),
        "inversion_eta": HParam(0.1, "η_inv, scale of the DDPM-std noise added per inverse step", low=0.0),
    },
    paper="Lu et al. 2025, InPO: Inversion Preference Optimization with Reparametrized DDIM for "
    "Efficient Diffusion Model Alignment (CVPR, arXiv:2503.18454)",
    equation="Eq. 15: Diffusion-DPO's −log σ(−β/2 · d) with x_t from DDIM inversion of x_0 by the model",
)
def inpo(
    batch: PreferenceBatch,
    state: dict[str, torch.Tensor],
    *,
    beta: float,
    inversion_steps: int,
    inversion_eta: float,
) -> LossOutput:
    """InPO: −log σ(β·(ρ_w − ρ_l)) = −log σ(−β/2 · d), Diffusion-DPO on statistics whose x_t is the
    DDIM inversion of each image by the current model (`preftune.diffusion.inversion`), with the
    target ε = (x_t − √ᾱ_t x_0)/√(1 − ᾱ_t) (its v or x_0 for a v- or x_0-prediction model, whose
    predictions the inversion converts to ε); a pair's images share t, not ε. The trainer makes x_t
    that way for this loss (`inversion_steps`, `inversion_eta` are read there). Defaults from the
    official script: 10 inverse steps, η_inv = 0.1; β = 2000 (the paper's SD 1.5 setting).
    Metrics: rewards = ρ (unscaled).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "inpo")
    losses = -log_sigmoid(beta * (rho_w - rho_l))
    # rewards are ρ itself (as smpo): β·ρ at β = 2000 would magnify float32 noise of ρ ≈ 0 to ~1e-3
    losses, metrics = finish(losses, valid, pair_metrics(rho_w, rho_l))
    return LossOutput(losses, metrics, {})


SEPPO_AAF = ("v1", "v2", "off")


def seppo_flip(rho_w: torch.Tensor) -> torch.Tensor:
    """SePPO's Anchor-based Adaptive Flipper: +1 (the reference sample is a loser) where the policy
    denoises the anchor x^w at least as well as the reference, mse_θ^w ≤ mse_ref^w (ρ_w ≥ 0); −1
    (the reference sample is treated as a winner) where the reference does better on the anchor."""
    return torch.where(rho_w.detach() >= 0, 1.0, -1.0)


@register(
    "seppo",
    kind="pairwise",
    needs_reference=True,
    monotone=False,  # at ρ_w = 0 the flipper switches sign: the loss jumps up there when ρ_ref > 0
    hparams={
        "beta": HParam(
            5000.0, "β (Diffusion-DPO units; the paper gives none — Diffusion-DPO's)", low=0.0, low_open=True
        ),
        "ref_every": HParam(30, "steps between the policy snapshots the reference is drawn from", low=1),
        "sample_steps": HParam(
            20, "DDIM (η = 0) steps of the reference sample that replaces the loser", low=1
        ),
        "aaf": HParam(
            "v1",
            "the AAF: v1 (a flipped pair's reference sample is a second winner), v2 (the revised paper: "
            "a flipped pair fits the anchor alone) or off (every reference sample a loser: the ablation)",
            choices=SEPPO_AAF,
        ),
    },
    paper="Zhang et al. 2024, SePPO: Semi-Policy Preference Optimization for Diffusion Alignment "
    "(arXiv:2410.05255)",
    equation="AAF loss (Eqs. 7–8 of the ICLR 2025 submission): −log σ(−β/2 · (Δ_w − c·Δ_ref)), "
    "Δ = mse_θ − mse_ref, c = +1 if Δ_w ≤ 0, else 0 (v2: DPO → SFT) or −1 (v1)",
)
def seppo(
    batch: PreferenceBatch,
    state: dict[str, torch.Tensor],
    *,
    beta: float,
    ref_every: int,
    sample_steps: int,
    aaf: str,
) -> LossOutput:
    """SePPO with the Anchor-based Adaptive Flipper: −log σ(β (ρ_w − c·ρ_ref)), c from `seppo_flip(ρ_w)`.

    Branch 0 is a winning image of the data (the anchor x^w), branch 1 the *reference sample*: an
    image the reference model — a previous checkpoint of the policy, drawn uniformly from the
    snapshots taken every `ref_every` steps — generated for the same prompt; it replaces the
    data's losing image (the trainer's `GeneratedLoserPhase` makes both, `sample_steps` DDIM steps).
    With ρ = −½ (mse_θ − mse_ref) = −½ Δ the logit is −β/2 · (Δ_w − s·Δ_ref):

    - s = +1 (the policy fits the anchor at least as well as the reference, Δ_w ≤ 0): the reference
      sample is a loser — this is Diffusion-DPO with x^ref as x^l (SPIN-Diffusion's loss);
    - s = −1 (the reference fits the anchor better, Δ_w > 0: per the paper's Theorem the reference is
      the better model here, so its sample is likely a winner). What the pair then trains differs
      between the paper's versions. `aaf="v1"` (the default; v1, Eqs. 7–8: c = s = −1):
      −log σ(−β/2 · (Δ_w + Δ_ref)) lowers the policy's error on both images. `aaf="v2"` (v2,
      "Self-Sampling Preference Optimization", July 2025, whose abstract says the training
      "switches from DPO to SFT" when the sample is likely a winner): the reference sample's term is
      dropped (c = 0) and −log σ(−β/2 · Δ_w) fits the anchor alone — an off-policy winning image,
      the only data the method trains on — in the same sigmoid and β as the pair's DPO term.

    From the paper: the reference is a uniformly drawn previous checkpoint (ref ∼ U(0, k−1)), its
    samples replace the losers, and the flipper's sign compares the current and the reference
    model's noise-prediction errors on the winning anchor under the same ε and t. Inferred (the
    paper has no training code): the tie Δ_w = 0 (always so at the first step, θ = θ_ref) counts as
    s = +1; β = 5000 (Diffusion-DPO's, in these units); s is detached (a decision, not a gradient
    path); snapshots every 30 steps follow the paper's checkpointing interval; v2's SFT as the DPO
    logit without the reference-sample term (only v2's abstract was readable here; an unscaled
    denoising mse would carry ~β/2 times less gradient than the pair's DPO term). `aaf="off"`
    is the paper's "w/o AAF" ablation (s = +1 always). Metrics: `seppo/flipped`
    is the AAF rate (the fraction of pairs with s = −1); rewards are ρ (unscaled).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "seppo")
    sign = seppo_flip(rho_w) if aaf != "off" else torch.ones_like(rho_w)
    coefficient = sign.clamp(min=0.0) if aaf == "v2" else sign  # a flipped pair: −1 (v1) or 0 (v2)
    losses = -log_sigmoid(beta * (rho_w - coefficient * rho_l))
    metrics = {**pair_metrics(rho_w, rho_l), "seppo/flipped": (sign < 0).float()}
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})


@register(
    "pso",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": HParam(
            5000.0, "β (Diffusion-DPO units; the paper's value is not known here)", low=0.0, low_open=True
        ),
        "sample_steps": HParam(
            4, "DDIM (η = 0) steps of the current model's reference image (few-step)", low=1
        ),
    },
    paper="Miao et al. 2025, Tuning Timestep-Distilled Diffusion Model Using Pairwise Sample "
    "Optimization (PSO, ICLR, arXiv:2410.03190)",
    equation="PSO objective: Diffusion-DPO's −log σ(−β/2 · d) with x^w a training image and x^l a "
    "reference image sampled from the current model",
)
def pso(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, sample_steps: int
) -> LossOutput:
    """PSO: −log σ(β (ρ_w − ρ_l)) = −log σ(−β/2 · d) where branch 0 is a training image and branch 1 a
    *reference image* sampled from the current (few-step) model for the same prompt.

    From the paper (its abstract; the method section's equations could not be read here, so no
    equation number is cited): PSO samples reference images from the current timestep-distilled
    model and increases the relative likelihood margin between the training images and them,
    pairwise as Diffusion-DPO, with offline- or online-sampled pairs. Inferred (no official code was
    found): π_ref is the frozen initial model; the online form is the default (the trainer's `GeneratedLoserPhase` samples the
    reference images with the policy's weights of the step, `sample_steps` DDIM steps, η = 0); the
    likelihood statistic is the seam's −½·mse at t uniform over the training schedule (the paper
    evaluates a distilled model at its few sampling timesteps, which a pipeline folder does not
    name); β = 5000 as Diffusion-DPO. The loss equals `dpo` on the same batch; what makes PSO is
    where branch 1 comes from. Metrics: rewards are ρ (unscaled).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "pso")
    losses = -log_sigmoid(beta * (rho_w - rho_l))
    losses, metrics = finish(losses, valid, pair_metrics(rho_w, rho_l))
    return LossOutput(losses, metrics, {})
