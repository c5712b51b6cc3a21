"""Plain-language findings a reader of a run report should not miss, read off the logged curves.

Each check is deliberately simple and states its rule in the message, so a reader can judge it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from preftune.eval.plots import metric_series

CHOSEN_DROP = 0.1  # nats per token: a fall of the chosen log-probability worth pointing out
OVERFIT_RISE = 0.10  # eval loss this far (relative) above its best value


def _ends(values: Sequence[float]) -> tuple[float, float]:
    """Mean of the first and of the last 10% of the values (at least one each), robust to noise."""
    k = max(1, len(values) // 10)
    return sum(values[:k]) / k, sum(values[-k:]) / k


def findings(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Observations from metrics records: over-optimisation and over-fitting signatures."""
    out: list[str] = []
    _, chosen = metric_series(records, "logps/chosen_per_token", "train")
    _, margin = metric_series(records, "rewards/margin", "train")
    if len(chosen) >= 5:
        first, last = _ends(chosen)
        margin_grew = len(margin) >= 5 and _ends(margin)[1] > _ends(margin)[0]
        if last - first < -CHOSEN_DROP and (margin_grew or not margin):
            out.append(
                f"Over-optimisation signature: the log-probability of the chosen responses fell from "
                f"{first:.3g} to {last:.3g} nats per token (train, first vs last 10% of steps)"
                + (" while the reward margin grew" if margin_grew else "")
                + ". The policy widens the margin by lowering the preferred answers too (Rashidinejad & "
                "Tian 2024; Shi et al. 2024). Try a lower lr or fewer steps, a larger β, or an SFT term "
                "on the chosen responses (rpo, or 'dpo:1.0,sft:0.2')."
            )
    steps, ev = metric_series(records, "loss", "eval")
    if len(ev) >= 3:
        best = min(range(len(ev)), key=lambda i: ev[i])
        if best < len(ev) - 1 and ev[-1] - ev[best] > OVERFIT_RISE * abs(ev[best]):
            out.append(
                f"Over-fitting: the eval loss was lowest at step {steps[best]:.0f} ({ev[best]:.4g}) and "
                f"ended {100 * (ev[-1] / ev[best] - 1):.0f}% higher ({ev[-1]:.4g}). The checkpoint near "
                "that step may be the better model."
            )
    return out
