"""Distillation terms (kind "distill"): a student trained on preference pairs towards full-vocabulary
teacher distributions, computed one chunk of positions at a time (`preftune.models.distill_head`).

    term         per position s_t of the chosen by `on` branches          teachers
    adpa         −Σ_a π_θ(a|s_t) (log π_dpo(a|s_t) − log π_ref(a|s_t))   π_dpo and its reference π_ref
    dckd         KL(π_dpo(·|s_t) ‖ π_θ(·|s_t))                            π_dpo
    aligndistil  KL(π_θ(·|s_t) ‖ softmax(z_ref + k(z_dpo − z_ref)))       π_dpo and π_ref, k = β_dpo/β
                 contrast=reverse: KL(π_θ ‖ softmax(z_dpo + k(z_dpo − z_dpo⁻)))  π_dpo and π_dpo⁻
    nll          −log π_θ(y_t|s_t) of the data's token (SFT; chosen)         none (next to a term)

A term's loss is the sum over its positions divided by the global count of those positions (every
micro-batch of every rank), so gradients do not depend on the micro-batch size. Terms combine by the
objective syntax: `parse_distill_objective("dckd:1,adpa:0.5")`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

from preftune.losses.registry import HParam, LossSpec, get, parse_objective
from preftune.models.distill_head import distill_token_losses, nll_token_losses

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
    π_dpo = π_ref the advantage is exactly 0 and so is the loss. The authors' trainer
    (github.com/SLIT-AI/ADPA, DistillTrainer.get_batch_loss_metrics) adds `sft_on_chosen` × the NLL
    of the chosen responses: `"adpa:1,nll:λ"` (the term `nll`)."""
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
    paper="Zhang et al. 2025, AlignDistil: Token-Level Language Model Alignment as Adaptive Policy "
    "Distillation (Theorem 1; contrastive DPO reward)",
    equation="L = mean_t KL(π_θ(·|s_t) ‖ softmax(z*)), z* = z_ref + k(z_dpo − z_ref) (Theorem 1) or "
    "z* = z_dpo + k(z_dpo − z_dpo⁻) (contrastive), k = β₀/β",
    on="chosen",
    teachers=2,
    hparams={
        "ratio": HParam(
            1.0,
            "k = β₀/β (β₀: the DPO model's β, β: the RLHF KL weight): 1 with contrast=reference "
            "distils π_dpo itself, > 1 extrapolates past it",
            low=0.0,
        ),
        "contrast": HParam(
            "reference",
            "what --teacher-ref is: 'reference' (π_ref, the model DPO started from; Theorem 1) or "
            "'reverse' (a reverse DPO model π_dpo⁻, trained on the pairs with chosen and rejected swapped: "
            "the contrastive DPO reward)",
            choices=("reference", "reverse"),
        ),
    },
)
def aligndistil(
    student: torch.Tensor, head: Any, teachers: list[torch.Tensor], heads: list[Any], **kw: Any
) -> torch.Tensor:
    """AlignDistil. Theorem 1: with the DPO reward r = β₀(log π_dpo − log π_ref) and a KL weight β
    towards π_ref, the RLHF objective equals token-level distillation of the policy towards
    π* ∝ π_ref (π_dpo/π_ref)^k, k = β₀/β, i.e. the logits z* = z_ref + k(z_dpo − z_ref); its loss at
    each position is the policy's KL to π*, KL(π_θ(·|s_t) ‖ π*(·|s_t)) (reverse KL, as the RLHF
    objective's expectation is over the policy). The contrastive DPO reward (`contrast="reverse"`)
    replaces π_ref by a reverse DPO model π_dpo⁻ (DPO on the swapped pairs) and extrapolates from
    π_dpo: z* = z_dpo + k(z_dpo − z_dpo⁻), i.e. π* ∝ π_dpo (π_dpo/π_dpo⁻)^k; k = 0 distils π_dpo
    itself (DCKD's teacher, in the reverse direction). Positions: the chosen responses (the paper's
    off-policy setting). Deviations: the loss is not multiplied by β (a constant scale), and the
    paper's token-adaptive ratio k_t (from the total variation between the two teachers) is not
    implemented: k is one constant."""
    rule = "contrastive" if kw["contrast"] == "reverse" else "extrapolated"
    return distill_token_losses(
        student, head, teachers, heads, rule=rule, transforms=kw["transforms"], ratio=kw["ratio"]
    )


@_register(
    "nll",
    paper="Gao et al. 2025, ADPA: the authors' trainer (DistillTrainer.get_batch_loss_metrics, "
    "`sft_on_chosen`) adds the SFT loss on the chosen responses to the ADPA term",
    equation="L = mean_t −log π_θ(y_t|s_t) on the chosen positions",
    on="chosen",
    teachers=0,
)
def nll(
    student: torch.Tensor, head: Any, teachers: list[torch.Tensor], heads: list[Any], **kw: Any
) -> torch.Tensor:
    """SFT next to a distillation term: the student's negative log-likelihood of the data's tokens,
    on the chosen responses by default. ADPA alone maximises Σ_a π_θ(a|s_t) A(s_t, a), linear in
    π_θ, whose optimum is the token of largest teacher log-ratio at every position, likely or not;
    the ADPA authors' trainer weights this term by `sft_on_chosen` (`"adpa:1,nll:λ"` here). Not a
    method of its own (it needs no teacher): give it after a distillation term."""
    return nll_token_losses(student, head, kw["targets"], transform=kw["transforms"][0])


def get_distill(name: str) -> LossSpec:
    """The registered distillation term `name`; ConfigError with a "did you mean" if unknown."""
    return get(name, DISTILL_LOSSES)


def parse_distill_objective(text: str) -> list[tuple[LossSpec, float]]:
    """Parse a weighted sum of distillation terms, e.g. "dckd:1,adpa:0.5"."""
    return parse_objective(text, DISTILL_LOSSES)
