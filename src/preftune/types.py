"""The bundles that cross the boundaries of the data flow (docs/algorithms.md, "Data flow").

data/  → `Example` (token ids of one prompt and its K response branches)
models/ → `SequenceStats` (per-sequence log-prob statistics, the only thing losses see from a model)
trainer → `PreferenceBatch` (statistics grouped per example, the input of every registered loss)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

Kind = Literal["pairwise", "unpaired", "ranked", "group"]


@dataclass
class Example:
    """One tokenized example: a prompt and K response branches that share it.

    pairwise: K = 2, `response_ids[0]` is chosen, `response_ids[1]` rejected; `label` is the optional
        soft preference p ∈ [0, 1] that chosen is better (smooth_dpo), `margins` the optional
        per-response margin rewards of other objectives (MODPO), shape [K][M]; `margin` the optional
        per-pair m of a reward model's bt_margin / bt_scaled losses (the data's `margin` column).
    unpaired: K = 1, `label` is 1.0 (desirable) or 0.0 (undesirable).
    ranked:   K ≥ 2 responses sorted best first, `scores` one per response (descending).
    group:    K = G responses sampled from the policy (online methods); `meta` carries each one's
        sampling log-probs, kept support and advantage (`preftune.rl.phase`).
    Response ids include the EOS token; prompt ids include the chat template's generation prompt.
    """

    prompt_ids: list[int]
    response_ids: list[list[int]]
    kind: Kind = "pairwise"
    label: float | None = None
    scores: list[float] | None = None
    margins: list[list[float]] | None = None
    source_row: int = -1  # 1-based row in the source file, for error messages
    meta: dict[str, object] = field(default_factory=dict)
    margin: float | None = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + sum(len(r) for r in self.response_ids)


@dataclass
class SequenceStats:
    """Per-sequence statistics of N response sequences under one model.

    logps:       [N] float32, Σ_t log π(y_t | x, y_<t) over response tokens only.
    lengths:     [N] int64, response token counts |y|.
    token_logps: [N, T] float32 per-token log-probs, zero where t ≥ lengths[n]; present only when asked.
    values:      [N, T] float32 a value head's V_t at each response token (PPO), when asked.
    """

    logps: torch.Tensor
    lengths: torch.Tensor
    token_logps: torch.Tensor | None = None
    values: torch.Tensor | None = None


@dataclass
class PreferenceBatch:
    """The input of every registered loss: statistics of E examples with K branches each.

    Branch order: pairwise [chosen, rejected]; unpaired [completion] (plus, for losses whose spec sets
    `needs_mismatched`, branch 1 = a completion of a *different* prompt, for KTO's z₀); ranked/listwise
    best first. Absent branches (ragged K) are False in `mask`.

    policy_logps:       [E, K] summed log-probs under the policy (carry gradients).
    lengths:            [E, K] response token counts.
    ref_logps:          [E, K] under the reference; None for reference-free methods.
    mask:               [E, K] bool, True where a branch exists; None means all present.
    policy_token_logps: [E, K, T] per-token log-probs (zero-padded), for token-level losses.
    ref_token_logps:    [E, K, T] the same under the reference.
    labels:             [E] unpaired label (1 desirable / 0 undesirable) or pairwise soft label p.
    scores:             [E, K] ranked scores.
    margins:            [E, K, M] MODPO margin rewards of M other objectives.
    """

    policy_logps: torch.Tensor
    lengths: torch.Tensor
    ref_logps: torch.Tensor | None = None
    mask: torch.Tensor | None = None
    policy_token_logps: torch.Tensor | None = None
    ref_token_logps: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    scores: torch.Tensor | None = None
    margins: torch.Tensor | None = None
