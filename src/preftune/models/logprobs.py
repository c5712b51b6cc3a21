"""Per-sequence log-probs of response tokens, from hidden states through the LM head in chunks.

    log π(y | x) = Σ_t log softmax(f(h_t) / τ)[y_t]

where h_t is the final hidden state at the token before y_t, f the LM head followed by the config's
logit scaling and soft-capping (Gemma 2: c·tanh(z/c)), and τ a sampling temperature. Only the hidden
states that predict response tokens go through the head, `chunk_tokens` at a time, each chunk under
activation checkpointing: neither forward nor backward ever holds `[tokens, vocab]` logits for more than
one chunk. The forward pass uses the packed prefix-shared layout of `preftune.models.packing` when the
architecture supports it (one prompt computation per example), else padded rows, with a warning.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch.utils.checkpoint import checkpoint

from preftune.errors import ConfigError, DataError
from preftune.models.direct_grads import embedding_inputs
from preftune.models.head_logps import HeadLogps, head_logps_forward, linear_head_scale
from preftune.models.load import unwrap_model
from preftune.models.packing import RowBatch, attention_masks, build_packed, build_padded, packing_support
from preftune.models.tree_attention import row_units, tree_attention, tree_supported
from preftune.types import Example, SequenceStats

# Elements of one chunk's logits: 2^22 float32 values = 16 MiB (32 tokens at a 128k vocabulary).
_CHUNK_ELEMENTS = 1 << 22
# Softmax kept from forward to backward by `HeadLogps`, in float32 copies of the head weight: 4 is the
# head's own training state (weight, gradient, two Adam moments), so keeping never more than doubles it.
_KEEP_WEIGHT_COPIES = 4
# Packed rows attend segment by segment where the model allows it (`preftune.models.tree_attention`).
_TREE_ATTENTION = True


class LogitTransform:
    """The config's map from LM-head output z to the logits the model samples from, then 1/τ.

    Cohere-style `logit_scale` (z·s), Granite-style `logits_scaling` (z/s), Gemma-2-style
    `final_logit_softcapping` (c·tanh(z/c)), then temperature τ (z/τ).
    """

    def __init__(self, config: Any, temperature: float = 1.0) -> None:
        if not temperature > 0:
            raise ConfigError(f"temperature={temperature}: must be > 0")
        self.scale = getattr(config, "logit_scale", None)
        self.divide = getattr(config, "logits_scaling", None)
        self.softcap = getattr(config, "final_logit_softcapping", None)
        self.temperature = float(temperature)

    def __call__(self, z: torch.Tensor) -> torch.Tensor:
        if self.scale is not None:
            z = z * self.scale
        if self.divide is not None:
            z = z / self.divide
        if self.softcap is not None:
            z = torch.tanh(z / self.softcap) * self.softcap
        if self.temperature != 1.0:
            z = z / self.temperature
        return z


def _chunk_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    transform: LogitTransform,
    min_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """log softmax(f(h))[y] for one chunk: hidden [C, H], targets [C] → [C] float32.

    With `min_logits` [C], the softmax runs over the kept support {z ≥ min_logits} only (the top-k /
    top-p set a sampler drew from, renormalised)."""
    logits = transform(head(hidden).float())  # [C, V], the only vocabulary-sized tensors are per chunk
    if min_logits is not None:
        logits = logits.masked_fill(logits < min_logits[:, None], float("-inf"))
    # log_softmax + gather: one fused kernel each way, ~2x faster on CPU than gather − logsumexp.
    return logits.log_softmax(-1).gather(-1, targets[:, None]).squeeze(-1)


class _FrozenHeadLogps(torch.autograd.Function):
    """Chunked log-probs through a head whose parameters are frozen (LoRA, or a frozen output layer).

    Each logp_m depends on its own hidden row h_m only, so ∂logp_m/∂h_m [M, H] can be formed chunk by
    chunk in forward and kept (it is hidden-sized, not vocabulary-sized); backward is then
    g_m · ∂logp_m/∂h_m with no recomputation: two head matmuls per token instead of three.
    """

    @staticmethod
    def forward(
        ctx: Any,
        hidden: torch.Tensor,
        targets: torch.Tensor,
        head: torch.nn.Module,
        transform: LogitTransform,
        size: int,
        min_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        outs, grads = [], []
        for start in range(0, hidden.shape[0], size):
            with torch.enable_grad():
                h = hidden[start : start + size].detach().requires_grad_(True)
                low = None if min_logits is None else min_logits[start : start + size]
                logp = _chunk_logps(h, targets[start : start + size], head, transform, low)
                (grad,) = torch.autograd.grad(logp.sum(), h)
            outs.append(logp.detach())
            grads.append(grad)
        ctx.save_for_backward(torch.cat(grads))
        return torch.cat(outs)

    @staticmethod
    def backward(ctx: Any, *grad_outputs: torch.Tensor) -> Any:
        (dlogp_dh,) = ctx.saved_tensors
        grad_h = grad_outputs[0][:, None].to(dlogp_dh.dtype) * dlogp_dh
        return grad_h, None, None, None, None, None


def chunked_token_logps(
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: torch.nn.Module,
    transform: LogitTransform,
    *,
    chunk_tokens: int | None = None,
    min_logits: torch.Tensor | None = None,
    keep_bytes: int | None = None,
) -> torch.Tensor:
    """Per-token log-probs of `targets` [M] given the hidden states [M, H] that predict them → [M] float32.

    `min_logits` [M] (optional): renormalise each token's softmax over the logits ≥ its threshold
    (the support a top-k / top-p sampler kept, see `preftune.rl.sampling`).

    Processes `chunk_tokens` rows at a time (default: 2^22 / vocab). With autograd on and a trainable
    plain linear head (no soft-capping), `HeadLogps` keeps each token's log-sum-exp and the softmax of
    the leading chunks within `keep_bytes` (default: 4 float32 copies of the head weight); backward
    uses the kept softmax or recomputes the chunk's logits once, turning them into their gradient in
    place; other trainable heads are checkpointed chunk by chunk; with a frozen head (LoRA), ∂logp/∂h
    is formed in forward and nothing is recomputed.
    """
    if hidden.shape[0] == 0:
        return hidden.new_zeros(0, dtype=torch.float32)
    weight: torch.Tensor = head.weight  # type: ignore[assignment]  # an nn.Linear or a LoRA-wrapped one
    vocab = getattr(head, "out_features", None) or weight.shape[0]
    size = chunk_tokens or max(16, _CHUNK_ELEMENTS // max(int(vocab), 1))
    frozen_head = not any(p.requires_grad for p in head.parameters())
    if torch.is_grad_enabled() and hidden.requires_grad and frozen_head:
        out: torch.Tensor = _FrozenHeadLogps.apply(hidden, targets, head, transform, size, min_logits)
        return out
    scale = linear_head_scale(head, transform) if min_logits is None and not frozen_head else None
    if scale is not None:  # a trainable linear head: one arithmetic with and without autograd
        keep = _KEEP_WEIGHT_COPIES * 4 * weight.numel() if keep_bytes is None else keep_bytes
        if not torch.is_grad_enabled():
            return head_logps_forward(hidden, targets, weight, scale, size, keep, keep=False)[0]
        linear: torch.Tensor = HeadLogps.apply(hidden, targets, weight, scale, size, keep)
        return linear
    outs = []
    for start in range(0, hidden.shape[0], size):
        h, y = hidden[start : start + size], targets[start : start + size]
        low = None if min_logits is None else min_logits[start : start + size]
        if torch.is_grad_enabled():
            out = checkpoint(_chunk_logps, h, y, head, transform, low, use_reentrant=False)
        else:
            out = _chunk_logps(h, y, head, transform, low)
        outs.append(out)
    return torch.cat(outs)


def _hidden_states(model: Any, batch: RowBatch) -> torch.Tensor:
    """Final hidden states [R, L, H] (after the final norm) for the rows of `batch`."""
    lm = unwrap_model(model)
    backbone = getattr(lm, getattr(lm, "base_model_prefix", ""), None)
    if backbone is None or lm.get_output_embeddings() is None:
        raise ConfigError(
            f"{type(lm).__name__} has no decoder body '{getattr(lm, 'base_model_prefix', '')}' and LM head: "
            "load a *ForCausalLM model (AutoModelForCausalLM)"
        )
    return trunk_hidden_states(backbone, lm.config, lm.dtype, batch)


def trunk_hidden_states(backbone: Any, config: Any, dtype: torch.dtype, batch: RowBatch) -> torch.Tensor:
    """Final hidden states [R, L, H] of a decoder body (`model.model`) on `batch`: the tree mask and
    branch positions for a packed batch, the 2-D padding mask for padded rows."""
    device = next(backbone.parameters()).device
    ids = batch.input_ids.to(device)
    tokens = embedding_inputs(backbone, ids)  # (the embedding's weight gradient straight into .grad)
    # (not under gradient checkpointing: its re-run forward in backward happens outside the block)
    recompute = getattr(backbone, "gradient_checkpointing", False) and torch.is_grad_enabled()
    if batch.shared and _TREE_ATTENTION and tree_supported(backbone.config) and not recompute:
        # segment by segment: no [L, L] mask; the 4-D placeholder only tells the model a mask is given
        with tree_attention(backbone.config):
            out = backbone(
                **tokens,
                attention_mask=torch.ones(ids.shape[0], 1, 1, 1, dtype=torch.bool, device=device),
                position_ids=batch.position_ids.to(device),
                use_cache=False,
                tree_units=row_units(batch),
            )
    elif batch.shared:
        mask = attention_masks(batch, config, dtype, device)
        out = backbone(
            **tokens, attention_mask=mask, position_ids=batch.position_ids.to(device), use_cache=False
        )
    else:
        out = backbone(**tokens, attention_mask=(batch.example_ids >= 0).long().to(device), use_cache=False)
    return out.last_hidden_state


def _warn_fallback(reason: str) -> None:
    warnings.warn(f"prefix-shared packing is off, using padded rows: {reason}", RuntimeWarning, stacklevel=3)


def _compute(
    model: Any,
    prompts: list[list[int]],
    branches: list[list[list[int]]],
    *,
    pack: bool,
    temperature: float,
    max_tokens_per_row: int | None,
    chunk_tokens: int | None,
    source_rows: list[int] | None,
    min_logits: list[torch.Tensor] | None = None,
    value_head: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(logps [N], lengths [N], token log-probs [M], for each of the M tokens its (n, t) index [M, 2],
    and with `value_head` its value [M] read from the same hidden state that predicts it)."""
    lm = unwrap_model(model)
    if not prompts:
        device = next(lm.parameters()).device
        empty = torch.zeros(0, dtype=torch.float32, device=device)
        index = torch.zeros(0, 2, dtype=torch.long, device=device)
        return empty, torch.zeros(0, dtype=torch.long, device=device), empty, index, None
    if pack:
        reason = packing_support(lm.config)
        if reason is not None:
            _warn_fallback(reason)
            pack = False
    if pack:
        batch = build_packed(
            prompts,
            branches,
            max_tokens_per_row=max_tokens_per_row,
            source_rows=source_rows,
            merge_prompts=True,
        )
    else:
        batch = build_padded(prompts, branches, source_rows=source_rows)
    hidden = _hidden_states(model, batch)
    device = hidden.device
    low = None
    if min_logits is not None:
        low = _token_thresholds(min_logits, batch.seq_index, batch.tok_index, len(batch.lengths)).to(device)
    rows, cols, targets, inverse = _distinct_positions(batch) if low is None else _all_positions(batch)
    tok = chunked_token_logps(
        hidden[rows.to(device), cols.to(device)],  # [M, H]
        targets.to(device),
        lm.get_output_embeddings(),
        LogitTransform(lm.config, temperature),
        chunk_tokens=chunk_tokens,
        min_logits=low,
    )
    if inverse is not None:
        tok = tok[inverse.to(device)]
    seq_index = batch.seq_index.to(device)
    logps = torch.zeros(len(batch.lengths), dtype=torch.float32, device=device).index_add(0, seq_index, tok)
    index = torch.stack([seq_index, batch.tok_index.to(device)], dim=1)
    values = None
    if value_head is not None:
        picked = hidden[batch.pred_rows.to(device), batch.pred_cols.to(device)]  # [M, H], each token
        values = value_head(picked).squeeze(-1).float()
    return logps, batch.lengths.to(device), tok, index, values


def _all_positions(batch: RowBatch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, None]:
    return batch.pred_rows, batch.pred_cols, batch.targets, None


def _distinct_positions(
    batch: RowBatch,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """(rows, cols, targets) of each distinct scored (position, target), and for each of the M tokens
    the index of its (position, target) (None when all are distinct). A response repeated under one prompt (pairs built from
    K responses) is laid out once by `build_packed(merge_prompts=True)`; its tokens are scored once."""
    rows, cols = batch.pred_rows, batch.pred_cols
    if not batch.shared or not len(rows):
        return _all_positions(batch)
    # a position plus its target: the first tokens of K branches share their predicting position
    key = (rows * batch.input_ids.shape[1] + cols) * (int(batch.targets.max()) + 1) + batch.targets
    distinct, inverse = torch.unique(key, return_inverse=True)
    if len(distinct) == len(rows):
        return _all_positions(batch)
    first = torch.empty(len(distinct), dtype=torch.long).scatter_(0, inverse, torch.arange(len(rows)))
    return rows[first], cols[first], batch.targets[first], inverse


def _token_thresholds(
    per_prompt: list[torch.Tensor], seq_index: torch.Tensor, tok_index: torch.Tensor, sequences: int
) -> torch.Tensor:
    """[M] support thresholds in the order of the packed targets, from per-prompt [K_i, ≥T_i] matrices."""
    rows = [row for part in per_prompt for row in part.float().cpu()]
    if len(rows) != sequences:
        raise ConfigError(
            f"min_logits: {len(rows)} rows for {sequences} responses; give [K_i, T_i] per prompt"
        )
    width = max((len(r) for r in rows), default=0)
    table = torch.full((sequences, max(width, 1)), float("-inf"))
    for i, r in enumerate(rows):
        table[i, : len(r)] = r
    seq, tok = seq_index.cpu(), tok_index.cpu()
    if len(tok) and int(tok.max()) >= width:
        raise ConfigError("min_logits: a response is longer than its row of thresholds")
    return table[seq, tok]


def _token_matrix(tok: torch.Tensor, index: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Scatter per-token log-probs into [N, T] (T = longest response), zero past each length."""
    width = int(lengths.max()) if len(lengths) else 0
    out = tok.new_zeros(len(lengths), width)
    return out.index_put((index[:, 0], index[:, 1]), tok)


def example_stats(
    model: Any,
    examples: list[Example],
    *,
    token_logps: bool = False,
    temperature: float = 1.0,
    max_tokens_per_row: int | None = None,
    pack: bool = True,
    chunk_tokens: int | None = None,
    min_logits: list[torch.Tensor] | None = None,
    value_head: Any = None,
) -> SequenceStats:
    """Statistics of every response branch of `examples` under `model`, flat and differentiable.

    Order: example 0 branch 0, example 0 branch 1, …, example 1 branch 0, … (N = Σ K_e sequences).
    logps [N] = Σ_t log π(y_t | x, y_<t) / per token at temperature τ (Rafailov et al. 2023, eq. 7 uses
    these sums); lengths [N]; token_logps [N, T] when asked. `max_tokens_per_row` caps a packed row
    (default: the longest example). `pack=False` forces padded rows. `min_logits[e]` ([K_e, ≥T_e],
    optional) renormalises each token's softmax over a sampler's kept support (see `sequence_logps`).
    `value_head` (a module [.., H] → [.., 1], PPO's critic on the policy trunk) adds `values` [N, T].
    """
    if getattr(model, "diffusion_spec", None) is not None:  # a denoiser: the diffusion seam's statistic
        from preftune.diffusion.denoiser import denoising_example_stats

        return denoising_example_stats(model, examples)
    if getattr(model, "is_sharded_policy", False):  # FSDP2 root: its forward runs this function
        extra = {} if min_logits is None else {"min_logits": min_logits}
        logps, lengths, matrix = model(
            examples,
            token_logps,
            temperature=temperature,
            max_tokens_per_row=max_tokens_per_row,
            pack=pack,
            chunk_tokens=chunk_tokens,
            **extra,
        )
        return SequenceStats(logps=logps, lengths=lengths, token_logps=matrix)
    prompts = [e.prompt_ids for e in examples]
    branches = [e.response_ids for e in examples]
    rows = [e.source_row for e in examples]
    logps, lengths, tok, index, values = _compute(
        model,
        prompts,
        branches,
        pack=pack,
        temperature=temperature,
        max_tokens_per_row=max_tokens_per_row,
        chunk_tokens=chunk_tokens,
        source_rows=rows,
        min_logits=min_logits,
        value_head=value_head,
    )
    matrix = _token_matrix(tok, index, lengths) if token_logps else None
    value_matrix = None if values is None else _token_matrix(values, index, lengths)
    return SequenceStats(logps=logps, lengths=lengths, token_logps=matrix, values=value_matrix)


def check_token_ids(model: Any, prompts: list[list[int]], branches: list[list[list[int]]]) -> None:
    """DataError unless every id of `prompts` and `branches` is one of the model's input embedding rows
    (ids of another tokenizer would fail deep inside the embedding with an IndexError)."""
    rows = model.get_input_embeddings().num_embeddings
    for i, (p, bs) in enumerate(zip(prompts, branches)):
        for part, ids in [("prompt", p), *((f"response {k}", b) for k, b in enumerate(bs))]:
            bad = next((t for t in ids if not 0 <= t < rows), None)
            if bad is not None:
                raise DataError(
                    f"example {i}, {part}: token id {bad} is not in the model's vocabulary (ids 0..{rows - 1})",
                    field="token ids",
                    fix="encode the text with this model's own tokenizer (AutoTokenizer.from_pretrained of its folder)",
                )


def sequence_logps(
    model: Any,
    prompt_ids: list[list[int]],
    response_ids: list[list[list[int]]],
    *,
    pack: bool = True,
    token_logps: bool = False,
    temperature: float = 1.0,
    max_tokens_per_row: int | None = None,
    min_logits: list[torch.Tensor] | None = None,
) -> list[torch.Tensor] | tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Summed response log-probs per prompt: `response_ids[i]` are the K_i responses to `prompt_ids[i]`.

    Returns a list with, for each prompt, a float32 tensor [K_i] of Σ_t log π(y_t | x, y_<t).
    With `token_logps=True`, returns `(sums, tokens)` where `tokens[i]` is [K_i, T_i] (T_i the longest of
    the K_i responses), zero past each response's end. Differentiable with respect to the model.
    `pack=True` computes each prompt once, shared by its responses; `pack=False` runs one padded row per
    response (the reference layout). Both give the same values. `min_logits[i]` ([K_i, ≥T_i], e.g.
    `Rollouts.grouped_min_logits`) renormalises each token's softmax over the support a top-k / top-p
    sampler kept: the temperature-scaled logits ≥ the token's threshold (−inf: all).
    """
    check_token_ids(unwrap_model(model), prompt_ids, response_ids)
    logps, lengths, tok, index, _ = _compute(
        model,
        prompt_ids,
        response_ids,
        pack=pack,
        temperature=temperature,
        max_tokens_per_row=max_tokens_per_row,
        chunk_tokens=None,
        source_rows=None,
        min_logits=min_logits,
    )
    counts = [len(r) for r in response_ids]
    sums = list(torch.split(logps, counts))
    if not token_logps:
        return sums
    matrix = _token_matrix(tok, index, lengths)
    tokens = []
    for part, lens in zip(torch.split(matrix, counts), torch.split(lengths, counts)):
        tokens.append(part[:, : int(lens.max()) if len(lens) else 0])
    return sums, tokens
