"""Log-probs of target tokens through a trainable linear LM head, chunk by chunk, with a hand-written
backward (no checkpointing): see `HeadLogps`.

    log p(y | h) = z_y − log Σ_v exp z_v,   z = c·W h,   ∂ log p / ∂z = onehot(y) − softmax(z)

(the softmax cross-entropy gradient; e.g. Goodfellow et al. 2016, Deep Learning, §6.2.2.3).
"""

from __future__ import annotations

from typing import Any

import torch

from preftune.models import direct_grads

# A chunk whose softmax is not kept forms its log-sum-exp in its logits buffer (False: `logsumexp`, which
# allocates a second `[chunk, V]` buffer for its exp; a benchmark lever).
_LSE_IN_PLACE = True


class HeadLogps(torch.autograd.Function):
    """Chunked log-probs through a trainable bias-free linear head W [V, H] with linear logits z = c·h·Wᵀ.

    Forward keeps each token's log-sum-exp [M] and, while their total stays within `keep_bytes`, the
    softmax p = exp(z − lse) of whole chunks (float32, `[chunk, V]`). Backward writes each chunk's logit
    gradient G = g·c·(onehot(y) − p) over its kept p (no further vocabulary-sized buffer; the graph
    cannot be run backward twice, `retain_graph` included: torch then reports the saved tensors as
    modified), or for the other chunks recomputes the logits once and writes G in place into that
    buffer; then ∂h = G·W and ∂W += Gᵀ·h (into `weight.grad` itself where
    `preftune.models.direct_grads.direct_grad` allows). A kept chunk costs
    three head matmuls per token (forward, two in backward) and 4·V bytes per token until backward;
    a recomputed one four matmuls and no vocabulary-sized memory between the passes. Either way
    backward has none of checkpointing's extra vocabulary-sized passes (a re-run log_softmax, a
    zero-filled `[chunk, V]` gather gradient and the log_softmax backward).
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        weight: torch.Tensor,
        scale: float,
        size: int,
        keep_bytes: int = 0,
    ) -> torch.Tensor:
        logps, lse, kept = head_logps_forward(hidden, targets, weight, scale, size, keep_bytes)
        ctx.save_for_backward(hidden, targets, weight, lse, *kept)
        ctx.scale, ctx.size = scale, size
        return logps

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        hidden, targets, weight, lse, *kept = ctx.saved_tensors
        grad = grad_outputs[0].float()
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = into = None
        if ctx.needs_input_grad[2]:  # ∂W straight into weight.grad where allowed, else a fresh buffer
            into = direct_grads.direct_grad(weight)
            grad_w = into if into is not None else torch.zeros_like(weight, dtype=torch.float32)
        for index, start in enumerate(range(0, hidden.shape[0], ctx.size)):
            stop = min(start + ctx.size, hidden.shape[0])
            h, g = hidden[start:stop], grad[start:stop, None] * ctx.scale
            if index < len(kept):  # G = g·c·(onehot(y) − p), written over the kept p
                logits = kept[index].mul_(-g)
            else:  # recompute the logits, then G in the same buffer
                logits = _linear_logits(h, weight, ctx.scale)
                logits.sub_(lse[start:stop, None]).exp_().mul_(-g)
            logits.scatter_add_(-1, targets[start:stop, None], g)
            grad_logits = logits.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:stop] = grad_logits @ weight
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t().float(), h.float())
        if into is not None or grad_w is None:  # (already in weight.grad: nothing for autograd to add)
            return grad_h, None, None, None, None, None
        return grad_h, None, grad_w.to(weight.dtype), None, None, None


def head_logps_forward(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weight: torch.Tensor,
    scale: float,
    size: int,
    keep_bytes: int,
    keep: bool = True,
) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """`HeadLogps`'s forward: (log-probs [M], log-sum-exp [M], the kept softmax chunks).

    Without gradients (`keep=False`: a reference pass, an evaluation) the same arithmetic runs chunk
    for chunk, so a trainable head's log-probs are bit-identical with and without autograd — the
    implicit reward of a policy against its own cached reference is exactly 0 at the first step.
    """
    outs, lses, kept = [], [], []
    budget = keep_bytes  # p of the leading chunks while it lasts
    for start in range(0, hidden.shape[0], size):
        z = _linear_logits(hidden[start : start + size], weight, scale)
        z_y = z.gather(-1, targets[start : start + size, None]).squeeze(-1)
        budget -= z.numel() * z.element_size()
        # exp(z − m) in the logits buffer itself (no second [chunk, V] buffer): one exp pass gives lse
        # and, for a kept chunk, p = exp(z − m) / Σ exp(z − m)
        if budget < 0 and not _LSE_IN_PLACE:
            lse = z.logsumexp(-1)
        else:
            top = z.amax(-1, keepdim=True)
            total = z.sub_(top).exp_().sum(-1, keepdim=True)
            if keep and budget >= 0:
                kept.append(z.div_(total))
            lse = (top + total.log()).squeeze(-1)
        outs.append(z_y - lse)
        lses.append(lse)
    return torch.cat(outs), torch.cat(lses), kept


def _linear_logits(hidden: torch.Tensor, weight: torch.Tensor, scale: float) -> torch.Tensor:
    z = (hidden @ weight.t()).float()
    return z * scale if scale != 1.0 else z


def linear_head_scale(head: torch.nn.Module, transform: Any) -> float | None:
    """c when the logits are c·(h·Wᵀ) through a plain bias-free `nn.Linear` (or tied embedding
    weight) with a trainable weight; None otherwise (soft-capping, a bias, LoRA, a sharded weight)."""
    weight = getattr(head, "weight", None)
    if type(head) is not torch.nn.Linear or head.bias is not None or transform.softcap is not None:
        return None
    if not isinstance(weight, torch.nn.Parameter) or type(weight.data) is not torch.Tensor:
        return None
    scale = 1.0 / transform.temperature
    if transform.scale is not None:
        scale *= float(transform.scale)
    if transform.divide is not None:
        scale /= float(transform.divide)
    return scale
