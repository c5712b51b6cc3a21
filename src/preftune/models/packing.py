"""Row layouts for a forward pass: packed prefix-shared rows, or plain padded rows.

Packed prefix-shared layout (one row holds several examples, no padding between them):

    row: [prompt₀][branch₀,₀][branch₀,₁] [prompt₁][branch₁,₀] … [pad at the row end only]

Each branch attends causally to its own prompt and to itself, never to a sibling branch or to another
example; the position ids of every branch continue from its prompt's end, so a branch sees exactly
what it would see as `prompt + branch` in a row of its own. The prompt is computed once for K branches.

Padded layout (the reference, and the fallback): one row per (example, branch) holding prompt + branch,
right-padded, with the usual 2-D padding mask.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from preftune.data.batching import pack_rows
from preftune.errors import DataError

# Families whose attention reads a custom 4-D mask and explicit position ids, checked token by token
# against separate forward passes in tests/test_models_logprobs.py.
PACKING_VERIFIED = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3_text", "gpt2")
_MASK_ATTENTION = ("sdpa", "eager")
_LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class RowBatch:
    """Token rows for one forward pass, and where to read each response token's log-prob.

    R rows of length L; M response tokens to score; N response sequences (flat: example-major).
    input_ids:    [R, L] int64 token ids (0 on padding at row ends).
    position_ids: [R, L] int64 positions; each branch continues from its prompt's end.
    example_ids:  [R, L] int64 example of each token within its row, -1 on padding.
    branch_ids:   [R, L] int64 0 on prompt tokens, b + 1 on tokens of branch b, -1 on padding.
    pred_rows, pred_cols: [M] int64 the token whose hidden state predicts response token m.
    targets:      [M] int64 the response token ids.
    seq_index:    [M] int64 flat sequence n that token m belongs to.
    tok_index:    [M] int64 position of token m within its response.
    lengths:      [N] int64 response lengths.
    shared:       True for the packed prefix-shared layout (custom 4-D mask needed), False for padded.
    """

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    example_ids: torch.Tensor
    branch_ids: torch.Tensor
    pred_rows: torch.Tensor
    pred_cols: torch.Tensor
    targets: torch.Tensor
    seq_index: torch.Tensor
    tok_index: torch.Tensor
    lengths: torch.Tensor
    shared: bool

    @property
    def num_tokens(self) -> int:
        """Real (non-padding) tokens in the batch."""
        return int((self.example_ids >= 0).sum())


def _check(prompts: list[list[int]], branches: list[list[list[int]]], rows: list[int] | None = None) -> None:
    if len(prompts) != len(branches):
        raise DataError(
            f"{len(prompts)} prompts but {len(branches)} response lists — give one list of "
            "responses per prompt"
        )
    for i, (p, bs) in enumerate(zip(prompts, branches)):
        row = rows[i] if rows is not None and rows[i] >= 0 else None
        where = "" if row is not None else f"example {i}: "
        if not p:
            raise DataError(
                f"{where}empty prompt: the first response token has nothing to be predicted from",
                row=row,
                field="prompt_ids",
                fix="start prompts with a BOS token",
            )
        if not bs:
            raise DataError(
                f"{where}no responses",
                row=row,
                field="response_ids",
                fix="give at least one response per prompt",
            )


def _finish(
    rows_ids: list[list[int]],
    rows_pos: list[list[int]],
    rows_ex: list[list[int]],
    rows_br: list[list[int]],
    pred: list[tuple[int, int, int, int, int]],
    lengths: list[int],
    shared: bool,
) -> RowBatch:
    width = max(len(r) for r in rows_ids)

    def pad(rows: list[list[int]], value: int) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows], dtype=torch.long)

    p = torch.tensor(pred, dtype=torch.long).reshape(-1, 5)
    return RowBatch(
        input_ids=pad(rows_ids, 0),
        position_ids=pad(rows_pos, 0),
        example_ids=pad(rows_ex, -1),
        branch_ids=pad(rows_br, -1),
        pred_rows=p[:, 0],
        pred_cols=p[:, 1],
        targets=p[:, 2],
        seq_index=p[:, 3],
        tok_index=p[:, 4],
        lengths=torch.tensor(lengths, dtype=torch.long),
        shared=shared,
    )


@dataclass
class _Unit:
    """One packing unit: a prompt and the distinct branches laid out after it."""

    prompt: list[int]
    branches: list[list[int]]

    @property
    def size(self) -> int:
        return len(self.prompt) + sum(len(b) for b in self.branches)


def _units(
    prompts: list[list[int]], branches: list[list[list[int]]], budget: int, merge: bool
) -> tuple[list[_Unit], list[tuple[int, int]]]:
    """Packing units, and for each flat sequence n its (unit, branch within the unit).

    Without `merge` a unit is an example. With it, examples with equal prompt ids share one unit and
    equal branches under one prompt are laid out once; a unit that would outgrow `budget` tokens is cut
    into several, each repeating the prompt, so no row is wider than it would be unmerged.
    """
    units: list[_Unit] = []
    where: list[tuple[int, int]] = []
    open_unit: dict[tuple[int, ...], int] = {}  # prompt -> the unit that still takes branches
    placed: dict[tuple[tuple[int, ...], tuple[int, ...]], tuple[int, int]] = {}
    for p, bs in zip(prompts, branches):
        key = tuple(p)
        if not merge:
            units.append(_Unit(p, list(bs)))
            where.extend((len(units) - 1, b) for b in range(len(bs)))
            continue
        for resp in bs:
            seen = placed.get((key, tuple(resp)))
            if seen is None:
                u = open_unit.get(key)
                if u is None or units[u].size + len(resp) > budget:
                    units.append(_Unit(p, []))
                    u = open_unit[key] = len(units) - 1
                units[u].branches.append(resp)
                seen = placed[(key, tuple(resp))] = (u, len(units[u].branches) - 1)
            where.append(seen)
    return units, where


def build_packed(
    prompts: list[list[int]],
    branches: list[list[list[int]]],
    *,
    max_tokens_per_row: int | None = None,
    source_rows: list[int] | None = None,
    merge_prompts: bool = False,
) -> RowBatch:
    """Pack examples (prompt + K branches each) into prefix-shared rows of ≤ `max_tokens_per_row` tokens.

    Rows are filled by first-fit decreasing; the default budget is the longest example's token count.
    An example longer than the budget gets a row of its own. Sequences are numbered flat in input order
    (example 0 branch 0, example 0 branch 1, …) whatever row they land in.

    `merge_prompts`: examples of the batch that share a prompt share its tokens too (pairs built from
    one prompt's K responses compute that prompt once, and each distinct response once); the sequences
    keep their flat numbers, a repeated response's tokens point at the one computed copy. Row example
    and branch ids then number units, not examples.
    """
    _check(prompts, branches, source_rows)
    sizes = [len(p) + sum(len(b) for b in bs) for p, bs in zip(prompts, branches)]
    budget = max_tokens_per_row if max_tokens_per_row is not None else max(sizes)
    units, where = _units(prompts, branches, budget, merge_prompts)
    lengths = [len(b) for bs in branches for b in bs]
    rows_ids: list[list[int]] = []
    rows_pos: list[list[int]] = []
    rows_ex: list[list[int]] = []
    rows_br: list[list[int]] = []
    readers: dict[tuple[int, int], list[int]] = {}  # unit branch -> the flat sequences that read it
    for n, ub in enumerate(where):
        readers.setdefault(ub, []).append(n)
    pred: list[tuple[int, int, int, int, int]] = []
    for r, members in enumerate(pack_rows([u.size for u in units], budget)):
        ids: list[int] = []
        pos: list[int] = []
        ex: list[int] = []
        br: list[int] = []
        for e in members:
            prompt = units[e].prompt
            last_prompt_col = len(ids) + len(prompt) - 1
            ids += prompt
            pos += range(len(prompt))
            ex += [e] * len(prompt)
            br += [0] * len(prompt)
            for b, resp in enumerate(units[e].branches):
                start = len(ids)
                ids += resp
                pos += range(len(prompt), len(prompt) + len(resp))
                ex += [e] * len(resp)
                br += [b + 1] * len(resp)
                for n in readers[(e, b)]:
                    for t, tok in enumerate(resp):
                        # token t is predicted by the branch's token t-1, or by the prompt's last token.
                        pred.append((r, start + t - 1 if t else last_prompt_col, tok, n, t))
        rows_ids.append(ids)
        rows_pos.append(pos)
        rows_ex.append(ex)
        rows_br.append(br)
    return _finish(rows_ids, rows_pos, rows_ex, rows_br, pred, lengths, shared=True)


def build_padded(
    prompts: list[list[int]], branches: list[list[list[int]]], *, source_rows: list[int] | None = None
) -> RowBatch:
    """One right-padded row per (example, branch) holding prompt + branch: the layout TRL uses for DPO."""
    _check(prompts, branches, source_rows)
    rows_ids: list[list[int]] = []
    rows_ex: list[list[int]] = []
    pred: list[tuple[int, int, int, int, int]] = []
    lengths: list[int] = []
    for prompt, bs in zip(prompts, branches):
        for resp in bs:
            r = len(rows_ids)
            rows_ids.append(prompt + resp)
            rows_ex.append([r] * (len(prompt) + len(resp)))
            lengths.append(len(resp))
            for t, tok in enumerate(resp):
                pred.append((r, len(prompt) + t - 1, tok, r, t))
    rows_pos = [list(range(len(r))) for r in rows_ids]
    rows_br = [[0] * len(r) for r in rows_ids]
    return _finish(rows_ids, rows_pos, rows_ex, rows_br, pred, lengths, shared=False)


def packing_support(config: Any) -> str | None:
    """None if the model described by `config` can run the packed layout, else the reason it cannot."""
    model_type = getattr(config, "model_type", None)
    if model_type not in PACKING_VERIFIED:
        return (
            f"model type '{model_type}' is not among those whose attention is verified to take a custom "
            f"4-D mask ({', '.join(PACKING_VERIFIED)})"
        )
    impl = getattr(config, "_attn_implementation", None)
    if impl not in _MASK_ATTENTION:
        return (
            f"attention implementation '{impl}' takes no custom 4-D mask — load the model with "
            "attn_implementation='sdpa' or 'eager' for prefix sharing"
        )
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and any(t not in _LAYER_TYPES for t in layer_types):
        return f"layer types {sorted(set(layer_types))} include one without a known mask rule"
    return None


def _allowed(batch: RowBatch, window: int | None, device: torch.device) -> torch.Tensor:
    """[R, 1, L, L] bool on `device`: may query token q attend to key token k."""
    # built where attention runs: the mask is L² per row, the ids only L
    ex, br, pos = (t.to(device) for t in (batch.example_ids, batch.branch_ids, batch.position_ids))
    length = ex.shape[1]
    idx = torch.arange(length, device=device)
    causal = idx[None, :, None] >= idx[None, None, :]  # [1, L(q), L(k)]
    same_example = (ex[:, :, None] == ex[:, None, :]) & (ex[:, None, :] >= 0)
    # a key in the prompt (branch 0) is visible to every branch; a branch key only to its own branch.
    same_branch = (br[:, None, :] == 0) | (br[:, :, None] == br[:, None, :])
    allowed = causal & same_example & same_branch
    if window is not None:
        allowed &= (pos[:, :, None] - pos[:, None, :]) < window
    # padding attends to itself only, so that no softmax row is empty (its output is never read).
    allowed |= (ex < 0)[:, :, None] & torch.eye(length, dtype=torch.bool, device=device)[None]
    return allowed[:, None]


def attention_masks(
    batch: RowBatch, config: Any, dtype: torch.dtype, device: torch.device
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The custom 4-D mask(s) of a prefix-shared batch, in the form the model's attention reads.

    SDPA reads a boolean mask (True = attend); eager attention adds the mask to the scores, so it gets
    0 / finfo.min. Models with per-layer attention types (`config.layer_types`) get one mask per type;
    sliding-window layers keep keys with position distance < `config.sliding_window`.
    """
    impl = getattr(config, "_attn_implementation", "sdpa")

    def render(window: int | None) -> torch.Tensor:
        allowed = _allowed(batch, window, device)
        if impl == "sdpa":
            return allowed
        zero = torch.zeros((), dtype=dtype, device=device)
        return torch.where(allowed, zero, torch.finfo(dtype).min)

    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is None:
        return render(window)
    return {t: render(window if t == "sliding_attention" else None) for t in set(layer_types)}
