"""Distillation terms (kind "distill"): a student trained on preference pairs towards full-vocabulary
teacher distributions, computed one chunk of positions at a time (`preftune.models.distill_head`).

    term         per position s_t of the chosen by `on` branches          teachers
    adpa         −Σ_a π_θ(a|s_t) (log π_dpo(a|s_t) − log π_ref(a|s_t))   π_dpo and its reference π_ref
    dckd         KL(π_dpo(·|s_t) ‖ π_θ(·|s_t))                            π_dpo
    aligndistil  KL(softmax(z_ref + k(z_dpo − z_ref)) ‖ π_θ(·|s_t))       π_dpo and π_ref, k = β_dpo/β

A term's loss is the sum over its positions divided by the global count of those positions (every
micro-batch of every rank), so gradients do not depend on the micro-batch size. Terms combine by the
objective syntax: `parse_distill_objective("dckd:1,adpa:0.5")`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from preftune.losses.registry import HParam, LossSpec, get, parse_objective
from preftune.models.distill_head import distill_token_losses

DISTILL_LOSSES: dict[str, LossSpec] = {}
BRANCHES = ("chosen", "rejected", "both")


def _register(
    name: str,
    *,
    paper: str,
    equation: str,
    on: str,
    teachers: int,
    hparams: Mapping[str, HParam] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    def wrap(fn: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        fn.teachers = teachers  # type: ignore[attr-defined]  # π_dpo only (1) or π_dpo and π_ref (2)
        DISTILL_LOSSES[name] = LossSpec(
            name=name,
            fn=fn,  # type: ignore[arg-type]  # returns per-position losses [M], not a LossOutput
            kind="distill",
            needs_reference=False,
            hparams={
                **(hparams or {}),
                "on": HParam(on, "the responses whose positions are distilled", choices=BRANCHES),
            },
            paper=paper,
            equation=equation,
            needs_token_logps=True,
            reduction="token",
        )
        return fn

    return wrap


@_register(
    "adpa",
    paper="Gao et al. 2025, Advantage-Guided Distillation for Preference Alignment (ADPA)",
    equation="L = −mean_t Σ_a π_θ(a|s_t) A(s_t, a),  A(s_t, a) = log π_dpo(a|s_t) − log π_ref(a|s_t)",
    on="rejected",
    teachers=2,
)
def adpa(
    student: torch.Tensor, head: Any, teachers: list[torch.Tensor], heads: list[Any], **kw: Any
) -> torch.Tensor:
    """ADPA: the student's expected teacher advantage at every position, over the whole vocabulary.

    The teacher's advantage A(s_t, a) = log π_dpo(a|s_t) − log π_ref(a|s_t) is the DPO model's
    implicit token reward (up to β); minimising −Σ_a π_θ(a|s_t) A(s_t, a) moves the student's
    distribution towards tokens the aligned teacher prefers over its reference. Positions: the
    rejected responses by default (the setting of the method description; `on` changes it). When
    π_dpo = π_ref the advantage is exactly 0 and so is the loss."""
    return distill_token_losses(student, head, teachers, heads, rule="advantage", transforms=kw["transforms"])


@_register(
    "dckd",
    paper="Gao et al. 2025, Dual-Constrained Knowledge Distillation (DCKD)",
    equation="L = mean_t KL(π_dpo(·|s_t) ‖ π_θ(·|s_t)) on chosen and on rejected positions",
    on="both",
    teachers=1,
)
def dckd(
    student: torch.Tensor, head: Any, teachers: list[torch.Tensor], heads: list[Any], **kw: Any
) -> torch.Tensor:
    """DCKD: forward KL from the aligned teacher to the student at the positions of both the chosen
    and the rejected response (the two constraints). ADPA+ is DCKD, then ADPA from its result."""
    return distill_token_losses(
        student, head, teachers, heads, rule="forward_kl", transforms=kw["transforms"]
    )


@_register(
    "aligndistil",
    paper="Zhang et al. 2025, AlignDistil: token-level distillation towards DPO-extrapolated logits",
    equation="L = mean_t KL(softmax(z_ref + k(z_dpo − z_ref)) ‖ π_θ), k = β_dpo/β",
    on="both",
    teachers=2,
    hparams={
        "ratio": HParam(
            1.0, "k = β_dpo/β (the paper's β₀/β): 1 distils π_dpo itself, > 1 extrapolates past it", low=0.0
        )
    },
)
def aligndistil(
    student: torch.Tensor, head: Any, teachers: list[torch.Tensor], heads: list[Any], **kw: Any
) -> torch.Tensor:
    """AlignDistil: with the DPO reward r = β_dpo(log π_dpo − log π_ref) and a KL weight β towards
    π_ref, the RLHF optimum is π* ∝ π_ref (π_dpo/π_ref)^k, k = β_dpo/β (the paper's β₀/β), i.e. the
    token logits z* = z_ref + k(z_dpo − z_ref); the student is distilled towards softmax(z*) token by
    token (forward KL). The contrastive (reverse-DPO) teacher and the per-token adaptive ratio of the
    paper are not implemented."""
    return distill_token_losses(
        student, head, teachers, heads, rule="extrapolated", transforms=kw["transforms"], ratio=kw["ratio"]
    )


def get_distill(name: str) -> LossSpec:
    """The registered distillation term `name`; ConfigError with a "did you mean" if unknown."""
    return get(name, DISTILL_LOSSES)


def parse_distill_objective(text: str) -> list[tuple[LossSpec, float]]:
    """Parse a weighted sum of distillation terms, e.g. "dckd:1,adpa:0.5"."""
    return parse_objective(text, DISTILL_LOSSES)
