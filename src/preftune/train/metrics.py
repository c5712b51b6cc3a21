"""The metrics every preference run logs (docs/algorithms.md §5), accumulated exactly over micro-batches and ranks.

Per-example values are summed with their counts (`MetricSums`) and divided once at the end of the
step, so a metric is the mean over the examples of the *global* batch, like the loss.

Trainer-side metrics (the losses add their own, e.g. `rewards/*` = β ρ):
    logps/chosen, logps/rejected   summed policy log-prob log π_θ(y|x) of the preferred / dispreferred
                                   branch (TRL's metrics of the same names)
    logps/chosen_per_token,        the same divided by the response length (comparable across lengths;
    logps/rejected_per_token       a falling chosen likelihood is the over-optimisation signature,
                                   Rashidinejad & Tian 2024; Shi et al. 2024)
    policy_rank_accuracy           logp_θ(y_w) > logp_θ(y_l), summed log-probs (Chen et al. 2024,
                                   "Preference learning algorithms do not learn preference rankings")
Which branches are "chosen"/"rejected": pairwise 0 / 1; ranked the best / the last present;
unpaired the completion of a desirable (label > 0.5) / undesirable example (no rank accuracy).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from preftune.types import PreferenceBatch


class MetricSums:
    """Means (name → Σ values, count) and totals (name → Σ, e.g. the loss, already globally
    normalised), merged across micro-batches and, through `state`/`merge`, across ranks.

    Values stay tensors on their device until `state()`/`result()`, so a GPU step synchronises once,
    not once per metric and micro-batch.
    """

    def __init__(self) -> None:
        self._sums: dict[str, list[Any]] = {}
        self._totals: dict[str, Any] = {}

    def add(self, name: str, values: torch.Tensor, valid: torch.Tensor | None = None) -> None:
        v = values.detach().double().reshape(-1)
        keep = torch.ones_like(v, dtype=torch.bool) if valid is None else valid.reshape(-1).to(torch.bool)
        s = self._sums.setdefault(name, [0.0, 0.0])
        s[0] = s[0] + torch.where(keep, v, torch.zeros_like(v)).sum()
        s[1] = s[1] + keep.sum()

    def add_total(self, name: str, value: float | torch.Tensor) -> None:
        if isinstance(value, torch.Tensor):
            value = value.detach().double()
        self._totals[name] = self._totals.get(name, 0.0) + value

    @property
    def totals(self) -> dict[str, float]:
        return {k: float(v) for k, v in self._totals.items()}

    def state(self) -> dict[str, Any]:
        """Plain floats: {"sums": {name: [Σ, count]}, "totals": {name: Σ}} (what ranks exchange)."""
        return {"sums": {k: [float(s), float(c)] for k, (s, c) in self._sums.items()}, "totals": self.totals}

    def merge(self, state: Mapping[str, Any]) -> None:
        for name, (total, count) in state["sums"].items():
            s = self._sums.setdefault(name, [0.0, 0.0])
            s[0] = s[0] + total
            s[1] = s[1] + count
        for name, value in state["totals"].items():
            self.add_total(name, value)

    def result(self) -> dict[str, float]:
        """Totals, then means of the names that had at least one valid value."""
        st = self.state()
        out = dict(st["totals"])
        out.update({k: s / c for k, (s, c) in st["sums"].items() if c > 0})
        return out


def preference_metrics(batch: PreferenceBatch, sums: MetricSums, *, unpaired: bool) -> None:
    """Add the trainer-side §5 metrics of `batch` to `sums`."""
    logps = batch.policy_logps.detach().float()
    per_token = logps / batch.lengths.float().clamp(min=1)
    rows = torch.arange(logps.shape[0], device=logps.device)
    if unpaired:
        desirable = (
            batch.labels > 0.5 if batch.labels is not None else torch.ones_like(rows, dtype=torch.bool)
        )
        _add_logps(sums, logps[:, 0], per_token[:, 0], desirable, logps[:, 0], per_token[:, 0], ~desirable)
        return
    e_count, k_max = logps.shape
    mask = (
        batch.mask
        if batch.mask is not None
        else torch.ones(e_count, k_max, dtype=torch.bool, device=logps.device)
    )
    last = mask.long().sum(dim=1) - 1
    valid = last > 0
    _add_logps(sums, logps[:, 0], per_token[:, 0], valid, logps[rows, last], per_token[rows, last], valid)
    sums.add("policy_rank_accuracy", (logps[:, 0] > logps[rows, last]).float(), valid)


def _add_logps(
    sums: MetricSums,
    chosen: torch.Tensor,
    chosen_per_token: torch.Tensor,
    chosen_valid: torch.Tensor,
    rejected: torch.Tensor,
    rejected_per_token: torch.Tensor,
    rejected_valid: torch.Tensor,
) -> None:
    sums.add("logps/chosen", chosen, chosen_valid)
    sums.add("logps/rejected", rejected, rejected_valid)
    sums.add("logps/chosen_per_token", chosen_per_token, chosen_valid)
    sums.add("logps/rejected_per_token", rejected_per_token, rejected_valid)
