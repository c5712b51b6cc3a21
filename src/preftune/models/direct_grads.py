"""Weight gradients added straight into a parameter's existing `.grad` by custom backwards (the LM
head's `preftune.models.head_logps.HeadLogps`, the input embedding's `EmbeddingRows`), instead of a
fresh weight-sized gradient that autograd then adds into `.grad`: one `[V, H]` buffer less while
that backward runs. With gradient accumulation every micro-batch after the first would otherwise
allocate it (the first one's fresh gradient becomes `.grad` without a copy either way).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

# > 0 while a caller's plain `.backward()` runs under `grads_into_params`: see `direct_grad`.
_INTO_PARAMS = 0
# Off: every custom backward returns its weight gradient to autograd (the benchmarks' `direct` lever).
_DIRECT_GRADS = True


@contextmanager
def grads_into_params() -> Iterator[None]:
    """Inside: a custom backward may add a leaf weight's gradient straight into its existing `.grad`.

    For a plain `loss.backward()` whose gradients accumulate into `.grad` and are read from there after
    it (the trainer's micro-batch loop). Never around `torch.autograd.grad` or `backward(inputs=...)`:
    there autograd hands gradients back instead of accumulating them, and `.grad` must stay untouched.
    """
    global _INTO_PARAMS
    _INTO_PARAMS += 1
    try:
        yield
    finally:
        _INTO_PARAMS -= 1


def direct_grad(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight.grad` when a backward may add into it in place instead of returning a fresh gradient
    (one `weight`-sized buffer less while that backward runs), else None: the caller returns its
    gradient to autograd as usual.

    Only under `grads_into_params`, for a float32 leaf whose `.grad` already exists as a plain dense
    float32 tensor of its shape on its device (a later micro-batch; the first one's fresh gradient
    becomes `.grad` without a copy anyway), with no hooks on it (DDP, FSDP and user hooks see every
    gradient through autograd) and outside grad mode (`create_graph=True` wants a differentiable sum).
    The sum differs from autograd's `.grad += fresh` by float32 rounding only: ((g + a) + b) against
    (g + (a + b)) for the chunks' contributions a, b.
    """
    grad = weight.grad
    if not (_INTO_PARAMS and _DIRECT_GRADS) or grad is None or torch.is_grad_enabled() or not weight.is_leaf:
        return None
    if weight._backward_hooks or getattr(weight, "_post_accumulate_grad_hooks", None):
        return None
    plain = type(weight) in (torch.Tensor, torch.nn.Parameter) and type(grad) is torch.Tensor
    same = grad.dtype == weight.dtype == torch.float32 and grad.device == weight.device
    if (
        plain
        and same
        and grad.shape == weight.shape
        and grad.layout == torch.strided
        and grad.is_contiguous()
    ):
        return grad
    return None


class EmbeddingRows(torch.autograd.Function):
    """`F.embedding(ids, weight, padding_idx)` whose backward adds the rows' gradients into `weight.grad`
    where `direct_grad` allows (`index_add_`, the padding row left out as `nn.Embedding` does), else
    returns torch's own `embedding_backward` (the dense `[V, H]` gradient autograd would form)."""

    @staticmethod
    def forward(ctx: Any, ids: torch.Tensor, weight: torch.Tensor, padding_idx: int) -> torch.Tensor:
        ctx.save_for_backward(ids, weight)
        ctx.padding_idx = padding_idx
        return torch.nn.functional.embedding(ids, weight, None if padding_idx < 0 else padding_idx)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        ids, weight = ctx.saved_tensors
        grad = grad_outputs[0]
        into = direct_grad(weight)
        if into is None:
            dense = torch.ops.aten.embedding_backward(
                grad, ids, weight.shape[0], ctx.padding_idx, False, False
            )
            return None, dense, None
        rows, flat = ids.reshape(-1), grad.reshape(-1, weight.shape[1])
        if ctx.padding_idx >= 0:
            keep = rows != ctx.padding_idx
            rows, flat = rows[keep], flat[keep]
        into.index_add_(0, rows, flat.to(into.dtype))
        return None, None, None


def embedding_inputs(backbone: Any, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """The backbone's token inputs: `inputs_embeds` through `EmbeddingRows` for a trainable plain
    `nn.Embedding` (no max_norm, frequency scaling or sparse gradient) under autograd, else `input_ids`."""
    embed = backbone.get_input_embeddings() if hasattr(backbone, "get_input_embeddings") else None
    if type(embed) is not torch.nn.Embedding or not torch.is_grad_enabled():
        return {"input_ids": ids}
    weight = embed.weight
    plain = embed.max_norm is None and not embed.scale_grad_by_freq and not embed.sparse
    if not (plain and weight.requires_grad and type(weight.data) is torch.Tensor):
        return {"input_ids": ids}
    padding = -1 if embed.padding_idx is None else int(embed.padding_idx)
    return {"inputs_embeds": EmbeddingRows.apply(ids, weight, padding)}
