"""Attention over a packed prefix-shared row, segment by segment, skipping the blocks the tree mask zeroes.

A packed row `[prompt][branch₁]…[branch_K] [prompt'][branch'₁]… [pad]` (see `preftune.models.packing`)
attends with a block-sparse mask: a prompt causally to itself, each branch to its prompt and causally
to itself, nothing across examples or sibling branches. The dense path builds that `[L, L]` mask and
runs one masked attention over the whole square. Here each segment runs its own scaled dot-product
attention (Vaswani et al. 2017, eq. 1, softmax(QKᵀ·s)V) on the keys it may see:

    prompt  P:  softmax(Q_P K_Pᵀ s + causal) V_P
    branch  B:  softmax(Q_B [K_P; K_B]ᵀ s + [0 | causal]) [V_P; V_B]

Masked-out keys carry zero softmax weight in the dense path, so dropping them leaves each query's
output unchanged (up to float summation order); padding queries (never read) get zeros. The work
falls from L² scores per row to Σ_segments |queries|·|visible keys| — for a prompt of P tokens and K
branches of B tokens, P²/2 + K·B·(P + B/2) instead of (P + K·B)².
"""

from __future__ import annotations

import functools
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from preftune.models.packing import RowBatch

NAME = "preftune_tree"
# Families whose attention modules pass the forward's keyword arguments to the attention function,
# checked against the dense-mask path in tests/test_models_tree_attention.py.
TREE_VERIFIED = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma")

Unit = tuple[int, int, list[tuple[int, int]]]  # prompt [start, stop), branches [(start, stop)]


def tree_supported(config: Any) -> bool:
    """True when `config`'s attention can run segment by segment: a verified family on SDPA, full
    attention in every layer (no sliding window) and no attention-logit soft-capping."""
    layer_types = getattr(config, "layer_types", None) or []
    return (
        getattr(config, "model_type", None) in TREE_VERIFIED
        and getattr(config, "_attn_implementation", None) == "sdpa"
        and getattr(config, "sliding_window", None) is None
        and all(t == "full_attention" for t in layer_types)
        and getattr(config, "attn_logit_softcapping", None) is None
    )


def row_units(batch: RowBatch) -> list[list[Unit]]:
    """Per row, its examples in order: the prompt span and each branch span (padding excluded)."""
    rows: list[list[Unit]] = []
    for ex, br in zip(batch.example_ids.tolist(), batch.branch_ids.tolist()):
        units: list[Unit] = []
        start = 0
        while start < len(ex) and ex[start] >= 0:
            stop = start
            while stop < len(ex) and ex[stop] == ex[start] and br[stop] == br[start]:
                stop += 1
            if br[start] == 0:
                units.append((start, stop, []))
            else:
                units[-1][2].append((start, stop))
            start = stop
        rows.append(units)
    return rows


@functools.lru_cache(maxsize=256)
def _branch_mask(prompt: int, branch: int, device: torch.device) -> torch.Tensor:
    """[B, P + B] bool: every prompt key, then causal over the branch's own keys (read only: cached,
    one per shape for every layer and step)."""
    idx = torch.arange(branch, device=device)
    own = idx[:, None] >= idx[None, :]
    return torch.cat([torch.ones(branch, prompt, dtype=torch.bool, device=device), own], dim=1)


def tree_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """The attention function (transformers' interface): q [R, Hq, L, D], k/v [R, Hkv, L, D] →
    [R, L, Hq, D]. Reads the row layout from the `tree_units` keyword (`row_units`)."""
    units: list[list[Unit]] = kwargs["tree_units"]
    groups = query.shape[1] // key.shape[1]
    if groups > 1:
        key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rows = []
    for r, row in enumerate(units):
        q, k, v = query[r : r + 1], key[r : r + 1], value[r : r + 1]
        parts = []
        for p0, p1, branches in row:
            parts.append(
                sdpa(q[:, :, p0:p1], k[:, :, p0:p1], v[:, :, p0:p1], None, dropout, True, scale=scaling)
            )
            for b0, b1 in branches:
                if b0 == p1:  # the first branch follows its prompt: its keys are one slice
                    kb, vb = k[:, :, p0:b1], v[:, :, p0:b1]
                else:
                    kb = torch.cat([k[:, :, p0:p1], k[:, :, b0:b1]], dim=2)
                    vb = torch.cat([v[:, :, p0:p1], v[:, :, b0:b1]], dim=2)
                mask = _branch_mask(p1 - p0, b1 - b0, query.device)
                parts.append(sdpa(q[:, :, b0:b1], kb, vb, mask, dropout, scale=scaling))
        used = sum(part.shape[2] for part in parts)
        if used < query.shape[2]:  # padding at the row end: never read
            parts.append(q.new_zeros(1, q.shape[1], query.shape[2] - used, value.shape[-1]))
        rows.append(torch.cat(parts, dim=2))
    return torch.cat(rows).transpose(1, 2).contiguous(), None


@contextmanager
def tree_attention(config: Any) -> Iterator[None]:
    """Run the model of `config` with `tree_attention_forward` inside the block (restored after)."""
    from transformers import AttentionInterface

    if NAME not in AttentionInterface._global_mapping:
        AttentionInterface.register(NAME, tree_attention_forward)
    previous = config._attn_implementation
    config._attn_implementation = NAME
    try:
        yield
    finally:
        config._attn_implementation = previous
