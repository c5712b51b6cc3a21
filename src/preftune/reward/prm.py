"""Process reward models: a score per step, read at each step's last token, prefix-shared.

    s_k = w · h_{e_k}(x ⊕ y_1 ⊕ … ⊕ y_K)      P(step k good) = σ(s_k)

e_k is the last token of step k (its separator). The trunk and scalar head are those of an outcome
reward model (`AutoModelForSequenceClassification(num_labels=1)`), read at every step end instead of
the last token only (Lightman et al. 2023, "Let's Verify Step by Step", §2.4; Wang et al. 2024,
Math-Shepherd, eq. 5). The solutions to one prompt are branches of one packed row: the prompt is
computed once and each branch's causal prefix is exactly its own solution, so the scores equal the
model's forward on `prompt + solution` in a row of its own.

Losses, per labelled step (a trainer divides their sum by the steps in the optimizer step):
    prm_bce   −[y_k log σ(s_k) + (1 − y_k) log(1 − σ(s_k))]      Math-Shepherd eq. 5 (soft y allowed)
    pav_mse   (s_k − Â_k)²                                        Setlur et al. 2024 (PAV), §3
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError
from preftune.models.logprobs import trunk_hidden_states
from preftune.models.packing import RowBatch, build_packed, build_padded, packing_support
from preftune.reward.scoring import _parts


def prm_bce(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of σ(s_k) against the step label y_k ∈ [0, 1], per step (Wang et al. 2024,
    Math-Shepherd, eq. 5: L = Σ_k y_k log r_k + (1 − y_k) log(1 − r_k), r_k = σ(s_k); soft y_k are the
    Monte-Carlo success rates of its soft estimation)."""
    return F.binary_cross_entropy_with_logits(scores, labels.to(scores), reduction="none")


def pav_mse(scores: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Squared error of the raw score s_k to the prover's advantage Â^μ_k = V^μ(s_{k+1}) − V^μ(s_k)
    (Setlur et al. 2024, "Rewarding Progress", eq. 4 and §3.2: a PAV regresses the advantage)."""
    return (scores - labels.to(scores)) ** 2


PRM_LOSSES: dict[str, Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "prm_bce": prm_bce,
    "pav_mse": pav_mse,
}


def step_probabilities(scores: torch.Tensor, loss: str) -> torch.Tensor:
    """What a step score means as a number: σ(s) for `prm_bce` (P(step good)), s itself for `pav_mse`
    (an advantage)."""
    return torch.sigmoid(scores) if loss == "prm_bce" else scores


def _token_places(batch: RowBatch, prompt_lens: list[int], counts: list[int]) -> torch.Tensor:
    """[N sequences, longest response] flat index row·L + column of each response token (−1 past the
    end): where token t of sequence n sits in `batch`."""
    ex, br, pos = batch.example_ids, batch.branch_ids, batch.position_ids
    width = ex.shape[1]
    plen = torch.tensor(prompt_lens, dtype=torch.long)
    if batch.shared:
        first = torch.tensor([0, *counts]).cumsum(0)
        r, c = ((ex >= 0) & (br > 0)).nonzero(as_tuple=True)
        e = ex[r, c]
        seq = first[e] + br[r, c] - 1
    else:  # padded: row n holds sequence n
        owner = torch.repeat_interleave(torch.arange(len(counts)), torch.tensor(counts))
        r, c = (ex >= 0).nonzero(as_tuple=True)
        e, seq = owner[r], r
    tok = pos[r, c] - plen[e]
    keep = tok >= 0
    r, c, seq, tok = r[keep], c[keep], seq[keep], tok[keep]
    table = torch.full((sum(counts), int(batch.lengths.max()) if len(batch.lengths) else 0), -1)
    table[seq, tok] = r * width + c
    return table


def step_scores(model: Any, prompts: list[list[int]], branches: list[list[list[int]]],
                ends: list[list[list[int]]], *, pack: bool = True) -> torch.Tensor:  # fmt: skip
    """Raw scores s_k [total steps] float32 of every step end, flat: prompt 0 branch 0 step 0, …

    `ends[i][b]` are the token indices (within branch b's response) where the steps end. Packed as in
    `preftune.reward.branch_scores` (padded rows where the architecture takes no custom mask).
    Differentiable with respect to the model."""
    lm, backbone, head = _parts(model)
    device = next(lm.parameters()).device
    if not prompts:
        return torch.zeros(0, dtype=torch.float32, device=device)
    if pack and (reason := packing_support(lm.config)) is not None:
        warnings.warn(
            f"prefix-shared packing is off, using padded rows: {reason}", RuntimeWarning, stacklevel=2
        )
        pack = False
    batch = build_packed(prompts, branches) if pack else build_padded(prompts, branches)
    hidden = trunk_hidden_states(backbone, lm.config, lm.dtype, batch)
    table = _token_places(batch, [len(p) for p in prompts], [len(b) for b in branches])
    flat = [(n, t) for n, e in enumerate(e for es in ends for e in es) for t in e]
    seq = torch.tensor([f[0] for f in flat], dtype=torch.long)
    tok = torch.tensor([f[1] for f in flat], dtype=torch.long)
    where = table[seq, tok]
    if bool((where < 0).any()):
        raise ConfigError("step_scores: a step end lies past its response's last token")
    width = batch.input_ids.shape[1]
    h = hidden[(where // width).to(device), (where % width).to(device)]
    return head(h).float().squeeze(-1)


AGGREGATIONS = ("min", "last", "sum", "mean", "prod", "steps")


def aggregate_steps(values: torch.Tensor, how: str) -> torch.Tensor:
    """One number from a solution's step values [K]: `min` (the weakest step; Lightman et al. 2023 use
    the product, Wang et al. 2024 the minimum), `last`, `sum`, `mean`, `prod`; `steps` (each value a
    reward at its step's end, for the PPO family's token credit) is their sum, the undiscounted return."""
    if how not in AGGREGATIONS:
        raise ConfigError(f"unknown step aggregation '{how}' (known: {', '.join(AGGREGATIONS)})")
    if values.numel() == 0:
        return values.new_zeros(())
    if how == "min":
        return values.min()
    if how == "last":
        return values[-1]
    if how in ("sum", "steps"):
        return values.sum()
    return values.mean() if how == "mean" else values.prod()


def prompt_runs(items: list[Any]) -> tuple[list[list[int]], list[list[list[int]]], list[list[list[int]]]]:
    """(prompts, branches, step ends) of `EncodedItem`s: each run of items with the same prompt
    becomes one prompt with its items' responses as branches (one packed row, one prompt pass)."""
    prompts: list[list[int]] = []
    branches: list[list[list[int]]] = []
    ends: list[list[list[int]]] = []
    for it in items:
        if prompts and prompts[-1] == it.prompt_ids:
            branches[-1].append(it.response_ids)
            ends[-1].append(it.ends)
        else:
            prompts.append(it.prompt_ids)
            branches.append([it.response_ids])
            ends.append([it.ends])
    return prompts, branches, ends


def score_encoded(model: Any, items: list[Any], *, pack: bool = True) -> list[torch.Tensor]:
    """Step scores of `EncodedItem`s (`preftune.reward.prm_data.encode_steps`), one tensor [K_i] per
    item; runs of items with the same prompt are branches of one packed row (one prompt pass)."""
    flat = step_scores(model, *prompt_runs(items), pack=pack)
    return list(flat.split([len(it.ends) for it in items]))
