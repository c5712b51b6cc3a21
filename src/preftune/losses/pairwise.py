"""Pairwise direct-alignment losses (ALGORITHMS.md §1): the DPO family on (chosen, rejected) pairs.

Notation: ρ = logp_θ − logp_ref, h = ρ_w − ρ_l. Each function returns per-pair losses [E] and the
metrics rewards/{chosen,rejected,margin,accuracy} (β ρ, or the method's own implicit reward).
"""

from __future__ import annotations

import torch

from preftune.losses.core import (
    finish,
    lengths,
    log_ratios,
    log_sigmoid,
    pair_metrics,
    policy_logps,
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

    Rafailov et al. 2023, Eq. 7. Default β = 0.1 (the paper's main-experiment value, §6).
    """
    rho_w, rho_l, valid = pair_log_ratios(batch, "dpo")
    losses = -log_sigmoid(beta * (rho_w - rho_l))
    losses, metrics = finish(losses, valid, pair_metrics(beta * rho_w, beta * rho_l))
    return LossOutput(losses, metrics, {})


__all__ = ["BETA", "dpo", "pair_log_ratios", "sigmoid_pair_loss", "lengths", "policy_logps"]
