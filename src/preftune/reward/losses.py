"""Reward-model losses as pure functions of scores, and weighted sums of them ("bt:1,center:0.01").

Pairwise losses take the chosen and rejected scores s_c, s_r [P] and a per-pair margin / strength m [P]
(the data's `margin` column) and return per-pair losses [P]; `regression` takes scores and ratings.
A trainer averages the per-pair losses over the pairs of a step (exact normalisation).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError

PairLoss = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def bt(s_c: torch.Tensor, s_r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry: −log σ(s_c − s_r) (Bradley & Terry 1952; Ouyang et al. 2022, eq. 1). m unused."""
    return -F.logsigmoid(s_c - s_r)


def bt_margin(s_c: torch.Tensor, s_r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Bradley–Terry with a margin: −log σ(s_c − s_r − m) (Touvron et al. 2023, Llama 2, eq. 2)."""
    return -F.logsigmoid(s_c - s_r - m)


def bt_scaled(s_c: torch.Tensor, s_r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Scaled Bradley–Terry: −m · log σ(s_c − s_r), m the preference strength (e.g. 1, 2, 3)
    (Wang et al. 2024, HelpSteer2-Preference, "Scaled Bradley-Terry")."""
    return -m * F.logsigmoid(s_c - s_r)


def center(s_c: torch.Tensor, s_r: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """Centering: (s_c + s_r)², pulls each pair's mean score to 0; its weight is η in a sum such as
    "bt:1,center:0.01" (Eisenstein et al. 2023, "Helping or Herding?", the auxiliary η(r⁺ + r⁻)²)."""
    return (s_c + s_r) ** 2


def regression(scores: torch.Tensor, ratings: torch.Tensor) -> torch.Tensor:
    """Regression on ratings: (s − rating)² per response (Dong et al. 2023, SteerLM; Wang et al. 2024,
    HelpSteer2: a scalar head fitted to human ratings by mean squared error)."""
    return (scores - ratings) ** 2


PAIR_LOSSES: dict[str, PairLoss] = {
    "bt": bt,
    "bt_margin": bt_margin,
    "bt_scaled": bt_scaled,
    "center": center,
}
RATING_LOSSES = {"regression": regression}
NEEDS_MARGIN = ("bt_margin", "bt_scaled")


@dataclass(frozen=True)
class RMLoss:
    """A weighted sum of pairwise reward-model losses: Σ_i w_i · loss_i(s_c, s_r, m), per pair."""

    terms: tuple[tuple[str, float], ...]

    @property
    def needs_margin(self) -> bool:
        return any(name in NEEDS_MARGIN for name, _ in self.terms)

    def __call__(self, s_c: torch.Tensor, s_r: torch.Tensor, m: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pair losses [P]; m defaults to 0 (bt_margin) / 1 (bt_scaled) where absent."""
        total = s_c.new_zeros(s_c.shape)
        for name, weight in self.terms:
            default = 1.0 if name == "bt_scaled" else 0.0
            margin = torch.full_like(s_c, default) if m is None else m.to(s_c)
            total = total + weight * PAIR_LOSSES[name](s_c, s_r, margin)
        return total


def parse_rm_loss(spec: str) -> RMLoss:
    """ "bt", or a weighted sum "bt:1,center:0.01" of the pairwise losses (names: PAIR_LOSSES)."""
    terms: list[tuple[str, float]] = []
    for part in (p.strip() for p in spec.split(",")):
        name, _, weight_text = part.partition(":")
        if name in RATING_LOSSES:
            raise ConfigError(
                f"reward-model loss '{name}' is fitted to rating data (prompt/response/rating), "
                f"not pairs; use one of {', '.join(PAIR_LOSSES)} for pairs"
            )
        if name not in PAIR_LOSSES:
            raise ConfigError(
                f"unknown reward-model loss '{name}' in '{spec}' (known: {', '.join(PAIR_LOSSES)} on pairs, "
                f"{', '.join(RATING_LOSSES)} on rating data); write e.g. 'bt' or 'bt:1,center:0.01'"
            )
        try:
            weight = float(weight_text) if weight_text else 1.0
        except ValueError:
            raise ConfigError(
                f"reward-model loss '{spec}': weight '{weight_text}' of '{name}' is not a number"
            ) from None
        if not math.isfinite(weight) or weight == 0:
            raise ConfigError(f"reward-model loss '{spec}': weight of '{name}' must be finite and non-zero")
        if any(name == n for n, _ in terms):
            raise ConfigError(f"reward-model loss '{spec}': '{name}' appears twice; merge its weights")
        terms.append((name, weight))
    return RMLoss(tuple(terms))
