"""Log-probs of target tokens through a trainable linear LM head, chunk by chunk, with a hand-written
backward (no checkpointing): see `HeadLogps`.

    log p(y | h) = z_y − log Σ_v exp z_v,   z = c·W h,   ∂ log p / ∂z = onehot(y) − softmax(z)

(the softmax cross-entropy gradient; e.g. Goodfellow et al. 2016, Deep Learning, §6.2.2.3).
"""

from __future__ import annotations

from typing import Any

import torch


class HeadLogps(torch.autograd.Function):
    """Chunked log-probs through a trainable bias-free linear head W [V, H] with linear logits z = c·h·Wᵀ.

    Forward keeps only each token's log-sum-exp [M]; backward recomputes a chunk's logits once and
    writes the logit gradient g·c·(onehot(y) − softmax(z)) in place into that buffer, then
    ∂h = G·W and ∂W += Gᵀ·h. Same four head matmuls per token as checkpointing `log_softmax +
    gather`, without its backward's extra vocabulary-sized passes (a re-run log_softmax, a
    zero-filled `[chunk, V]` gather gradient and the log_softmax backward).
    """

    @staticmethod
    def forward(
        ctx: Any, hidden: torch.Tensor, targets: torch.Tensor, weight: torch.Tensor, scale: float, size: int
    ) -> torch.Tensor:
        outs, lses = [], []
        for start in range(0, hidden.shape[0], size):
            z = _linear_logits(hidden[start : start + size], weight, scale)
            lse = z.logsumexp(-1)
            outs.append(z.gather(-1, targets[start : start + size, None]).squeeze(-1) - lse)
            lses.append(lse)
        ctx.save_for_backward(hidden, targets, weight, torch.cat(lses))
        ctx.scale, ctx.size = scale, size
        return torch.cat(outs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        hidden, targets, weight, lse = ctx.saved_tensors
        grad = grad_outputs[0].float()
        grad_h = torch.empty_like(hidden) if ctx.needs_input_grad[0] else None
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if ctx.needs_input_grad[2] else None
        for start in range(0, hidden.shape[0], ctx.size):
            stop = min(start + ctx.size, hidden.shape[0])
            h, g = hidden[start:stop], grad[start:stop, None]
            logits = _linear_logits(h, weight, ctx.scale)
            # G = g·c·(onehot(y) − p), built in the logits buffer
            logits.sub_(lse[start:stop, None]).exp_().mul_(-g * ctx.scale)
            logits.scatter_add_(-1, targets[start:stop, None], g * ctx.scale)
            grad_logits = logits.to(hidden.dtype)
            if grad_h is not None:
                grad_h[start:stop] = grad_logits @ weight
            if grad_w is not None:
                grad_w.addmm_(grad_logits.t().float(), h.float())
        return grad_h, None, None if grad_w is None else grad_w.to(weight.dtype), None, None


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
