"""Unpaired and negative-only losses (docs/algorithms.md §2): KTO on labelled single completions, D2O
on human negatives anchored by self-generated samples."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from preftune.errors import ConfigError
from preftune.losses.core import branch_mask, clean, finish, log_ratios, log_sigmoid, valid_examples
from preftune.losses.pairwise_losses import BETA
from preftune.losses.registry import BatchStatistic, HParam, LossOutput, register
from preftune.types import PreferenceBatch


def clamped_mean(total: torch.Tensor, count: torch.Tensor) -> torch.Tensor:
    """max(0, total / count), detached; 0 when count is 0 — KTO's z₀ and Diffusion-KTO's z."""
    return (total / count.clamp(min=1)).clamp(min=0.0).detach()


@dataclass(frozen=True)
class ReferencePoint:
    """A KTO-style reference point: max(0, mean of ``scale``·ρ over the present examples of one
    branch), detached, taken over the whole global batch (the trainer adds :meth:`sums` over every
    micro-batch and rank, then :meth:`state` puts the point into the loss's state).

    ``loss`` names the loss for :func:`log_ratios`; ``total_key`` is the name of the sum in the
    statistic, ``state_key`` the name of the point in the state.
    """

    loss: str
    branch: int
    total_key: str
    state_key: str
    scale: float = 1.0

    def sums(self, batch: PreferenceBatch, **_: object) -> dict[str, torch.Tensor]:
        """Σ scale·ρ over the branch's present examples and their count, detached."""
        mask = branch_mask(batch)
        if mask.shape[1] <= self.branch:
            zero = torch.zeros((), device=mask.device)
            return {self.total_key: zero, "count": zero}  # the loss itself names the missing branch
        w = mask[:, self.branch].float()
        rho = self.scale * log_ratios(batch, self.loss)[:, self.branch].detach()
        return {self.total_key: (rho * w).sum(), "count": w.sum()}

    def point(self, sums: dict[str, torch.Tensor]) -> torch.Tensor:
        """max(0, total / count) from :meth:`sums` (of one batch or a global batch); 0 if none."""
        return clamped_mean(sums[self.total_key], sums["count"])

    def state(
        self, state: dict[str, torch.Tensor], sums: dict[str, torch.Tensor], **_: object
    ) -> dict[str, torch.Tensor]:
        """The state for every micro-batch of a step: the point of the whole global batch."""
        return {**state, self.state_key: self.point(sums)}

    def value(self, batch: PreferenceBatch, state: dict[str, torch.Tensor]) -> torch.Tensor:
        """The point the trainer passed in ``state``, else the one of this batch alone."""
        if self.state_key in state:
            return state[self.state_key].detach().float()
        return self.point(self.sums(batch))

    @property
    def statistic(self) -> BatchStatistic:
        return BatchStatistic(self.sums, self.state)


# KTO's z₀ = max(0, mean of ρ(y′)) over the mismatched completions (branch 1)
KTO_POINT = ReferencePoint("kto", branch=1, total_key="rho_sum", state_key="z0")
kto_sums = KTO_POINT.sums
kto_reference_point = KTO_POINT.point
kto_state = KTO_POINT.state


@register(
    "kto",
    kind="unpaired",
    needs_reference=True,
    needs_mismatched=True,
    batch_statistic=KTO_POINT.statistic,
    hparams={
        "beta": BETA,
        "desirable_weight": HParam(1.0, "λ_D, weight of desirable examples", low=0.0),
        "undesirable_weight": HParam(1.0, "λ_U, weight of undesirable examples", low=0.0),
    },
    paper="Ethayarajh et al. 2024, KTO: Model Alignment as Prospect Theoretic Optimization (ICML)",
    equation="Eq. 8, L_KTO = E[λ_y − v(x, y)] (number from transcriptions of the paper)",
)
def kto(
    batch: PreferenceBatch,
    state: dict[str, torch.Tensor],
    *,
    beta: float,
    desirable_weight: float,
    undesirable_weight: float,
) -> LossOutput:
    """KTO: λ_D(1 − σ(β(ρ − z₀))) if desirable, λ_U(1 − σ(β(z₀ − ρ))) if undesirable.

    Ethayarajh et al. 2024, Eq. 8 with v(x, y) = λ_D σ(β(r_θ − z₀)) / λ_U σ(β(z₀ − r_θ)), so
    λ_y − v = λ_y(1 − σ(·)); r_θ = ρ unscaled, z₀ on the same scale. Branch 0 is the completion y
    (label 1/0 in `batch.labels`), branch 1 a completion y′ of a *different* prompt scored under this
    prompt; z₀ = max(0, mean ρ(y′)), detached (the paper's estimate ẑ₀, as TRL's KL term). The
    trainer computes z₀ over the whole global batch — every micro-batch and every rank — before
    the step (`batch_statistic`) and passes it as `state["z0"]`, so the gradient does not depend on
    how the batch is split (TRL 1.16 gathers its KL estimate across ranks, per micro-batch);
    called without it, the loss estimates z₀ from its own batch. Defaults β = 0.1,
    λ_D = λ_U = 1 (TRL's defaults; the paper advises λ_D n_D / (λ_U n_U) ∈ [1, 4/3] for imbalanced
    data, the bounds TRL's KTOTrainer warns outside).
    """
    if batch.labels is None:
        raise ConfigError("loss 'kto' needs a 0/1 label per completion (batch.labels)")
    mask = branch_mask(batch)
    if mask.shape[1] < 2:
        raise ConfigError(
            "loss 'kto' needs branch 1 = a completion of a different prompt (needs_mismatched) for its "
            "reference point z₀; the batch has one branch"
        )
    valid = valid_examples(batch, 1)
    rho = log_ratios(batch, "kto")
    z0 = KTO_POINT.value(batch, state)
    desirable = clean(batch.labels, valid) > 0.5
    rho_y = rho[:, 0]
    losses = torch.where(
        desirable,
        desirable_weight * (1.0 - torch.sigmoid(beta * (rho_y - z0))),
        undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - rho_y))),
    )
    metrics = {
        "rewards/implicit": beta * rho_y,
        "rewards/accuracy": torch.where(desirable, rho_y > z0, rho_y < z0).float(),
        "kto/z0": z0.expand_as(rho_y),
    }
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})


def last_present(mask: torch.Tensor) -> torch.Tensor:
    """[E] index of the last True in each row of `mask` [E, K] (0 for an all-False row)."""
    k = mask.shape[1]
    idx = torch.arange(k, device=mask.device).expand_as(mask)
    return torch.where(mask, idx, torch.zeros_like(idx)).max(dim=1).values


@register(
    "d2o",
    kind="listwise",
    needs_reference=True,
    hparams={
        "beta": HParam(
            0.1, "β, weight of the self-sampled responses' mean log-ratio", low=0.0, low_open=True
        ),
        "alpha": HParam(0.1, "α, weight of the human negative's log-ratio", low=0.0, low_open=True),
    },
    paper="Duan et al. 2024, Negating Negatives: Alignment with Human Negative Samples via "
    "Distributional Dispreference Optimization (D2O, Findings of EMNLP)",
    equation="§3.2, Eq. 3 (number from a transcription of arXiv v2, not the paper itself)",
)
def d2o(batch: PreferenceBatch, state: dict[str, torch.Tensor], *, beta: float, alpha: float) -> LossOutput:
    """D2O: −log σ((β/K) Σ_k ρ⁻(ŷ_k) − α ρ⁺(y_l)), ρ^± = logp_θ − logp of reference π_r^±.

    Duan et al. 2024, §3.2 Eq. 3 — form, coefficients and defaults checked against two independent
    transcriptions of the paper (a course excerpt of arXiv v2 and a reimplementation's README); the
    paper text itself was not reachable. Data: a list whose *last present* branch is the human
    negative y_l and whose other K ≥ 1 branches are responses ŷ_k ∼ π_r self-sampled from the
    initial (SFT) model (ragged via the mask). The paper allows two references — π_r⁻ (more
    harmful) for the samples, π_r⁺ (more helpful) for the negative — but its experiments set both
    to the initial model, as here (the run's one reference model). With K = 1 and α = β it is DPO
    with the sample as chosen. Defaults α = β = 0.1: the paper's setting (§4, K = 11 samples).
    """
    mask = branch_mask(batch)
    last = last_present(mask)
    count = mask.sum(dim=1)
    valid = count >= 2
    rho = log_ratios(batch, "d2o")
    is_last = torch.arange(mask.shape[1], device=mask.device)[None, :] == last[:, None]
    samples = mask & ~is_last
    k = samples.sum(dim=1).clamp(min=1).float()
    rho_samples = (rho * samples.float()).sum(dim=1) / k
    rho_neg = rho.gather(1, last[:, None])[:, 0]
    r_w, r_l = beta * rho_samples, alpha * rho_neg
    losses = -log_sigmoid(r_w - r_l)
    margin = (r_w - r_l).detach()
    metrics = {
        "rewards/chosen": r_w,
        "rewards/rejected": r_l,
        "rewards/margin": margin,
        "rewards/accuracy": (margin > 0).float(),
    }
    losses, metrics = finish(losses, valid, metrics)
    return LossOutput(losses, metrics, {})
