"""More pairwise DPO variants (the rest of TRL's `loss_type` list): EXO, NCA, SPPO (hard labels),
APO-zero/down, DiscoPOP and AOT. Notation as in docs/algorithms.md: ρ = logp_θ − logp_ref,
h = ρ_w − ρ_l; each returns per-pair losses [E] and the reward metrics βρ."""

from __future__ import annotations

import math

import torch

from preftune.losses.core import finish, log_sigmoid, pair_metrics, ref_logps, safe_exp
from preftune.losses.pairwise_losses import BETA, pair_log_ratios, sigmoid_pair_loss
from preftune.losses.registry import HParam, LossOutput, register
from preftune.types import PreferenceBatch


@register(
    "exo_pair",
    kind="pairwise",
    needs_reference=True,
    hparams={
        "beta": BETA,
        "epsilon": HParam(
            1e-3, "ε, label smoothing of the target distribution (1−ε, ε)", low=0.0, high=0.5, low_open=True
        ),
    },
    paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model Alignment (EXO, ICML; "
    "arXiv:2402.00856)",
    equation="Eq. 16 (EXO-pref, K = 2; the number TRL's exo_pair cites)",
)
def exo_pair(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, epsilon: float
) -> LossOutput:
    """EXO: KL(q ‖ p), q = (σ(βh), σ(−βh)) the model's, p = (1−ε, ε) the smoothed labels.

    Ji et al. 2024, Eq. 16 with K = 2: q_w (log q_w − log(1−ε)) + q_l (log q_l − log ε), the reverse
    KL from the label distribution (mode seeking) where DPO minimises the forward one. ε = 1e-3 is
    the paper's recommended value (TRL's docs of `label_smoothing` for EXO); ε must be > 0. Same
    expression as TRL 1.16's exo_pair (tested). At π_θ = π_ref: −log 2 − ½ log(ε(1−ε)).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "exo_pair")
    z = beta * (rho_w - rho_l)
    log_qw, log_ql = log_sigmoid(z), log_sigmoid(-z)
    losses = torch.exp(log_qw) * (log_qw - math.log1p(-epsilon)) + torch.exp(log_ql) * (
        log_ql - math.log(epsilon)
    )
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "nca_pair",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with Explicit Rewards (NCA, "
    "NeurIPS; arXiv:2402.05369)",
    equation="§3, NCA loss for K = 2 responses (form = TRL's nca_pair; eq. number not verified offline)",
)
def nca_pair(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """NCA: −log σ(βρ_w) − ½ log σ(−βρ_w) − ½ log σ(−βρ_l).

    Chen et al. 2024: noise-contrastive estimation with the preferred response as data and both
    responses as noise; it scores each response against the reference on its own (absolute
    rewards), so it keeps the chosen likelihood from falling as DPO's relative margin can.
    Same expression as TRL 1.16's nca_pair (tested). At π_θ = π_ref: 2 log 2.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "nca_pair")
    r_w, r_l = beta * rho_w, beta * rho_l
    losses = -log_sigmoid(r_w) - 0.5 * log_sigmoid(-r_w) - 0.5 * log_sigmoid(-r_l)
    losses, metrics = finish(losses, valid, pair_metrics(r_w, r_l))
    return LossOutput(losses, metrics, {})


@register(
    "sppo_hard",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": HParam(0.1, "β = 1/η; the targets are ±1/(2β)", low=0.0, low_open=True)},
    paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model Alignment (SPPO; "
    "arXiv:2405.00675)",
    equation="Eq. 4.7 (Algorithm 1) with hard probabilities P̂ = 1 (winner), 0 (loser)",
)
def sppo_hard(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """SPPO (hard): (ρ_w − 1/(2β))² + (ρ_l + 1/(2β))².

    Wu et al. 2024, Eq. 4.7: (log π_θ/π_t (y) − η(P̂(y ≻ π_t) − ½))² per response with η = 1/β; the
    paper estimates P̂ with a preference model (PairRM), the hard form sets it to 1 for the chosen
    and 0 for the rejected response, as TRL 1.16's sppo_hard (tested). The reference is π_t, the
    policy of the previous self-play round. At π_θ = π_ref: 1/(2β²).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "sppo_hard")
    target = 0.5 / beta
    losses = (rho_w - target) ** 2 + (rho_l + target) ** 2
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


APO_PAPER = (
    "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions: Addressing "
    "Underspecification in Alignment (APO; arXiv:2408.06266)"
)


@register(
    "apo_zero",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper=APO_PAPER,
    equation="Eq. 7 (APO-zero)",
)
def apo_zero(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """APO-zero: (1 − σ(βρ_w)) + σ(βρ_l).

    D'Oosterlinck et al. 2024, Eq. 7: anchored to the reference, it raises the chosen and lowers the
    rejected likelihood — for chosen responses better than the model's own outputs. Same
    expression as TRL 1.16's apo_zero (tested). At π_θ = π_ref: 1.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "apo_zero")
    losses = (1.0 - torch.sigmoid(beta * rho_w)) + torch.sigmoid(beta * rho_l)
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "apo_down",
    kind="pairwise",
    needs_reference=True,
    hparams={"beta": BETA},
    paper=APO_PAPER,
    equation="Eq. 8 (APO-down)",
)
def apo_down(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float) -> LossOutput:
    """APO-down: σ(βρ_w) + (1 − σ(β(ρ_w − ρ_l))).

    D'Oosterlinck et al. 2024, Eq. 8: lowers both likelihoods, the rejected one more — for chosen
    responses worse than the model's own outputs. At π_θ = π_ref the gradient on ρ_w is 0 (the two
    terms cancel) and the margin still grows. Same expression as TRL 1.16's apo_down (tested).
    At π_θ = π_ref: 1.
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "apo_down")
    losses = torch.sigmoid(beta * rho_w) + (1.0 - torch.sigmoid(beta * (rho_w - rho_l)))
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "discopop",
    kind="pairwise",
    needs_reference=True,
    monotone=False,
    hparams={
        "beta": HParam(0.05, "β, scale of the margin (the paper's 0.05)", low=0.0, low_open=True),
        "tau": HParam(
            0.05, "τ, temperature of the modulation σ(βh/τ) (the paper's 0.05)", low=0.0, low_open=True
        ),
    },
    paper="Lu et al. 2024, Discovering Preference Optimization Algorithms with and for Large Language "
    "Models (DiscoPOP, NeurIPS; arXiv:2406.08414)",
    equation="Eq. 5 (log-ratio modulated loss, LRML)",
)
def discopop(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, tau: float
) -> LossOutput:
    """DiscoPOP (LRML): (1 − m)·(−log σ(βh)) + m·e^{−βh}, m = σ(βh/τ).

    Lu et al. 2024, Eq. 5: a blend of DPO's logistic loss and the exponential loss, modulated by
    the margin itself; β = τ = 0.05 as in the paper (TRL 1.16's discopop_tau default; same
    expression as its discopop, tested). The loss is not monotone in h: within |βh| ≲ 2τ of 0 it
    rises with the margin (the paper notes its non-convexity), so at π_θ = π_ref the first step can
    shrink the margin. Deviation: e^{−βh} is continued linearly above exponent 40 (finite for
    log-ratios of ±1e4; there m = 0 anyway).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "discopop")
    x = beta * (rho_w - rho_l)
    m = torch.sigmoid(x / tau)
    losses = (1.0 - m) * -log_sigmoid(x) + m * safe_exp(-x)
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


def sorted_in_order(values: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """The valid entries of `values` [E] sorted ascending, then the invalid ones (as a finite filler)."""
    filler = values.detach().masked_fill(~valid, float("-inf")).max().clamp(min=0.0) + 1.0
    return torch.sort(torch.where(valid, values, filler), dim=0).values


def place(terms: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Put the first n = |valid| entries of `terms` (sorted positions) on the valid examples, in order."""
    order = torch.argsort((~valid).to(torch.int8), stable=True)  # valid examples first
    kept = torch.where(torch.arange(terms.shape[0], device=terms.device) < valid.sum(), terms, 0.0)
    return torch.zeros_like(terms).scatter(0, order, kept)


AOT_HPARAMS = {
    "beta": BETA,
    "epsilon": HParam(0.0, "ε, label smoothing of the sorted-margin loss", low=0.0, high=0.5, high_open=True),
}
AOT_PAPER = (
    "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport (AOT, "
    "NeurIPS; arXiv:2406.05882)"
)


@register(
    "aot",
    kind="pairwise",
    needs_reference=True,
    coupled=True,
    hparams=AOT_HPARAMS,
    paper=AOT_PAPER,
    equation="§3, paired AOT: first-order stochastic dominance of the sorted margins (form = TRL's aot; "
    "eq. number not verified offline)",
)
def aot(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, epsilon: float) -> LossOutput:
    """AOT (paired): sigmoid loss of β(sort(u)_i − sort(v)_i), u = logp_θ(y_w) − logp_θ(y_l), v the same
    under the reference.

    Melnyk et al. 2024: alignment as first-order stochastic dominance of the policy's margin
    distribution over the reference's, whose 1-D optimal transport plan matches the sorted samples:
    term i is −(1−ε) log σ(βΔ_i) − ε log σ(−βΔ_i), Δ_i = u_(i) − v_(i). The batch is the sample,
    so the loss couples the examples of one call: the trainer computes it per micro-batch (as TRL
    per device batch); set micro_batch_size = batch_size for the paper's batch. Term i is reported
    on the i-th valid example. Same expression as TRL 1.16's aot (tested). At π_θ = π_ref: log 2
    (ε = 0).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "aot")
    u = rho_w - rho_l  # carries the policy's gradient; v below = u − h is the reference margin
    ref = ref_logps(batch, "aot")
    v = torch.where(valid, ref[:, 0] - ref[:, 1], 0.0)
    u = u + v  # policy margin logp_θ(y_w) − logp_θ(y_l)
    delta = sorted_in_order(u, valid) - sorted_in_order(v, valid)
    losses = place(sigmoid_pair_loss(beta * delta, 1.0 - epsilon), valid)
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


@register(
    "aot_unpaired",
    kind="pairwise",
    needs_reference=True,
    coupled=True,
    hparams=AOT_HPARAMS,
    paper=AOT_PAPER,
    equation="§3, unpaired AOT: dominance of the sorted chosen over the sorted rejected log-ratios "
    "(form = TRL's aot_unpaired; eq. number not verified offline)",
)
def aot_unpaired(
    batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, epsilon: float
) -> LossOutput:
    """AOT (unpaired): sigmoid loss of β(sort(ρ_w)_i − sort(ρ_l)_i).

    Melnyk et al. 2024: the chosen log-ratios' distribution should dominate the rejected ones';
    chosen and rejected are sorted separately, so the pairing in the data is not used. Per
    micro-batch, like `aot`. Same expression as TRL 1.16's aot_unpaired (tested). At
    π_θ = π_ref: log 2 (ε = 0).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "aot_unpaired")
    delta = sorted_in_order(rho_w, valid) - sorted_in_order(rho_l, valid)
    losses = place(sigmoid_pair_loss(beta * delta, 1.0 - epsilon), valid)
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})
