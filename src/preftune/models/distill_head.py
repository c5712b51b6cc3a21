"""Token-level distillation losses over the whole vocabulary, one chunk of positions at a time.

A student's final hidden states h [M, H] and each teacher's [M, H_k] at the same M positions go
through their LM heads `chunk_tokens` positions at a time; the chunk's per-token loss is formed from
the chunk's logits and the chunk is checkpointed, so neither forward nor backward holds a
`[M, vocab]` tensor of any model — only `[chunk, vocab]` ones.

    rule         per-token loss (p = π_θ, the student; q = π_dpo and r the second teacher)
    advantage    −Σ_a p(a) · (log q(a) − log r(a)),  r = π_ref          ADPA (Gao et al. 2025)
    forward_kl   Σ_a q(a) (log q(a) − log p(a))                         DCKD (Gao et al. 2025)
    extrapolated Σ_a p(a) (log p(a) − log q*(a)),  q* = softmax(z_r + k (z_q − z_r)),  r = π_ref
                                                                         AlignDistil (Zhang et al. 2025)
    contrastive  Σ_a p(a) (log p(a) − log q*(a)),  q* = softmax(z_q + k (z_q − z_r)),  r = π_dpo⁻
                 (a reverse DPO model)                                   AlignDistil, contrastive reward

`nll_token_losses` gives −log p(y_t) of the data's tokens through the same chunked head (the SFT
term the ADPA authors' trainer adds on the chosen responses).
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from preftune.errors import ConfigError
from preftune.models.logprobs import _CHUNK_ELEMENTS, LogitTransform

RULES = ("advantage", "forward_kl", "extrapolated", "contrastive")


def _logits(hidden: torch.Tensor, head: torch.nn.Module, transform: LogitTransform) -> torch.Tensor:
    return transform(head(hidden).float())


def _chunk_loss(
    student: torch.Tensor,
    teachers: tuple[torch.Tensor, ...],
    heads: tuple[torch.nn.Module, ...],
    transforms: tuple[LogitTransform, ...],
    rule: str,
    ratio: float,
) -> torch.Tensor:
    """[C] per-token losses of one chunk (see the module table)."""
    logp = _logits(student, heads[0], transforms[0]).log_softmax(-1)
    with torch.no_grad():
        z_q = _logits(teachers[0], heads[1], transforms[1])
        if rule == "forward_kl":
            target = z_q.log_softmax(-1)
        else:
            z_r = _logits(teachers[1], heads[2], transforms[2])
            if rule == "advantage":
                target = z_q.log_softmax(-1) - z_r.log_softmax(-1)  # A(s_t, ·): exactly 0 when q = r
            elif rule == "extrapolated":
                target = (z_r + ratio * (z_q - z_r)).log_softmax(-1)
            else:  # contrastive: extrapolate π_dpo away from the reverse DPO model
                target = (z_q + ratio * (z_q - z_r)).log_softmax(-1)
            del z_r
        del z_q
    if rule == "advantage":
        return -(logp.exp() * target).sum(-1)
    if rule == "forward_kl":
        return (target.exp() * (target - logp)).sum(-1)
    return (logp.exp() * (logp - target)).sum(-1)  # AlignDistil: the student's KL to q* (reverse KL)


def distill_token_losses(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    teacher_hiddens: list[torch.Tensor],
    teacher_heads: list[torch.nn.Module],
    *,
    rule: str,
    transforms: list[LogitTransform],
    ratio: float = 1.0,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-position losses [M] float32 of `rule` (see the module table), differentiable with respect
    to the student's hidden states and head. `teacher_hiddens` / `teacher_heads`: [π_dpo] for
    `forward_kl`, [π_dpo, π_ref] for `advantage` and `extrapolated`, [π_dpo, π_dpo⁻] for
    `contrastive` (k = `ratio`); `transforms`:
    student's, then each teacher's logit transform. Chunks of `chunk_tokens` positions (default
    2^22 / vocab), each checkpointed when autograd is on."""
    if rule not in RULES:
        raise ConfigError(f"distillation rule '{rule}': known {', '.join(RULES)}")
    need = 1 if rule == "forward_kl" else 2
    if len(teacher_hiddens) != need or len(teacher_heads) != need or len(transforms) != need + 1:
        raise ConfigError(
            f"distillation rule '{rule}' needs {need} teacher(s) with their heads and transforms"
        )
    rows = student_hidden.shape[0]
    if any(h.shape[0] != rows for h in teacher_hiddens):
        raise ConfigError("distillation: teacher and student hidden states must cover the same positions")
    if rows == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    vocabs = {
        int(getattr(h, "out_features", 0) or h.get_parameter("weight").shape[0])
        for h in [student_head, *teacher_heads]
    }
    if len(vocabs) != 1:
        raise ConfigError(
            f"distillation: the student and teachers have different vocabularies {sorted(vocabs)}"
        )
    size = chunk_tokens or max(16, _CHUNK_ELEMENTS // max(vocabs.pop(), 1))
    heads = (student_head, *teacher_heads)
    outs = []
    for start in range(0, rows, size):
        part = slice(start, start + size)
        args: tuple[Any, ...] = (
            student_hidden[part],
            tuple(t[part] for t in teacher_hiddens),
            heads,
            tuple(transforms),
            rule,
            ratio,
        )
        if torch.is_grad_enabled():
            outs.append(checkpoint(_chunk_loss, *args, use_reentrant=False))
        else:
            outs.append(_chunk_loss(*args))
    return torch.cat(outs)


def _chunk_nll(
    student: torch.Tensor, head: torch.nn.Module, transform: LogitTransform, targets: torch.Tensor
) -> torch.Tensor:
    logp = _logits(student, head, transform).log_softmax(-1)
    return -logp.gather(-1, targets[:, None]).squeeze(-1)


def nll_token_losses(
    student_hidden: torch.Tensor,
    student_head: torch.nn.Module,
    targets: torch.Tensor,
    *,
    transform: LogitTransform,
    chunk_tokens: int | None = None,
) -> torch.Tensor:
    """Per-position negative log-likelihoods [M] float32, −log p(y_t | s_t), of the tokens `targets`
    [M] under the student, `chunk_tokens` positions at a time (each chunk checkpointed when autograd
    is on), so no `[M, vocab]` tensor exists."""
    rows = student_hidden.shape[0]
    if targets.shape != (rows,):
        raise ConfigError(f"nll: targets {tuple(targets.shape)} must be one token per position ({rows})")
    if rows == 0:
        return student_hidden.new_zeros(0, dtype=torch.float32)
    vocab = int(getattr(student_head, "out_features", 0) or student_head.get_parameter("weight").shape[0])
    size = chunk_tokens or max(16, _CHUNK_ELEMENTS // max(vocab, 1))
    targets = targets.to(student_hidden.device)
    outs = []
    for start in range(0, rows, size):
        part = slice(start, start + size)
        args = (student_hidden[part], student_head, transform, targets[part])
        if torch.is_grad_enabled():
            outs.append(checkpoint(_chunk_nll, *args, use_reentrant=False))
        else:
            outs.append(_chunk_nll(*args))
    return torch.cat(outs)
