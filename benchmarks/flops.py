"""Executed FLOPs of one DPO optimizer step, per side: the matmuls each side really runs.

A forward pass over one row of L tokens of which S go through the LM head costs

    2·N_body·L  +  4·h·L²·layers  +  2·V·h·S

(N_body: the weight-matrix parameters of the transformer layers; 4·h·L² per layer: the attention
scores Q·Kᵀ and their product with V over the full L×L square, which is what a dense-mask attention
computes, masked cells included; V·h: the LM head). A trained forward costs 3× (backward = 2×
forward, Kaplan et al. 2020 §2.1), a reference forward 1×. Padding in a row is executed and counted;
recomputation (preftune's chunked LM head recomputes each chunk's logits in backward) is not, as in
the usual model-FLOP utilisation.

Rows per side (lengths p, c, r per pair, responses with their EOS):
- preftune: one packed row per example (prompt once, then both responses), rows padded to the
  longest (`preftune.models.packing.build_packed`); attention segment by segment (the prompt's
  causal half, each response over its prompt and itself: `tree_attention_flops`), not the L×L
  square; the head scores the c + r response tokens.
- TRL: a chosen row and a rejected row per pair, each prompt + completion, padded to the longest
  row of the forward; on CPU the head scores every position but the last (L − 1 per row), on a GPU
  (and in the `gpu` variant) only the completion tokens.
"""

from __future__ import annotations

from collections.abc import Sequence

import bench_utils as bu

Pair = Sequence[int]  # (prompt, chosen, rejected) token counts, EOS included in the responses


def forward_flops(spec: bu.ModelSpec, row_len: int, scored: int) -> float:
    """One forward over a row of `row_len` tokens with `scored` positions through the LM head."""
    h, layers = spec.hidden_size, spec.num_layers
    kv = h * spec.num_kv_heads // spec.num_heads
    body = layers * (2 * h * h + 2 * h * kv + 3 * h * spec.intermediate_size)
    return 2.0 * body * row_len + 4.0 * h * row_len**2 * layers + 2.0 * spec.vocab_size * h * scored


def tree_attention_flops(spec: bu.ModelSpec, prompt: int, branches: Sequence[int]) -> float:
    """Attention FLOPs of one example's segments (`preftune.models.tree_attention`): the prompt's
    causal half (SDPA `is_causal` skips the blocks above the diagonal) and each branch's full
    rectangle over its prompt and itself (its mask is applied, not skipped)."""
    cells = prompt * (prompt + 1) / 2 + sum(b * (prompt + b) for b in branches)
    return 4.0 * spec.hidden_size * cells * spec.num_layers


def preftune_step(
    spec: bu.ModelSpec,
    pairs: Sequence[Pair],
    *,
    online_reference: bool,
    tree: bool = True,
    micro_pairs: int | None = None,
) -> float:
    """Executed FLOPs of one preftune DPO step over `pairs`, `micro_pairs` per forward (default: all
    in one): every row position through the body, attention segment by segment (`tree=False`: over
    each row's L×L square, the dense-mask path), the head on the response tokens."""
    size = micro_pairs or len(pairs)
    if size < len(pairs):
        return sum(
            preftune_step(spec, pairs[i : i + size], online_reference=online_reference, tree=tree)
            for i in range(0, len(pairs), size)
        )
    from preftune.models.packing import build_packed

    batch = build_packed([[0] * p for p, _, _ in pairs], [[[0] * c, [0] * r] for _, c, r in pairs])
    n_rows, width = batch.input_ids.shape
    scored = sum(c + r for _, c, r in pairs)
    body = forward_flops(spec, 1, 0) - forward_flops(spec, 0, 0) - 4.0 * spec.hidden_size * spec.num_layers
    attention = sum(tree_attention_flops(spec, p, (c, r)) for p, c, r in pairs)
    if not tree:
        attention = n_rows * (forward_flops(spec, int(width), 0) - int(width) * body)
    fwd = n_rows * int(width) * body + attention + forward_flops(spec, 0, scored)
    return fwd * (3 + (1 if online_reference else 0))


def trl_step(
    spec: bu.ModelSpec,
    pairs: Sequence[Pair],
    *,
    micro_pairs: int,
    online_reference: bool,
    response_only: bool,
) -> float:
    """Executed FLOPs of one TRL DPO step over `pairs`, `micro_pairs` pairs per forward."""
    total = 0.0
    for i in range(0, len(pairs), micro_pairs):
        micro = pairs[i : i + micro_pairs]
        width = max(p + max(c, r) for p, c, r in micro)
        for _, c, r in micro:
            for resp in (c, r):
                scored = resp if response_only else width - 1
                total += forward_flops(spec, width, scored)
    return total * (3 + (1 if online_reference else 0))
