"""Held-out evaluation of a reward model: pairwise accuracy and calibration (`preftune eval RUN`)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig


def calibration(gaps: torch.Tensor, bins: int = 10) -> dict[str, float]:
    """Calibration of the Bradley–Terry probability p = σ(s_c − s_r) that the chosen response wins.

    ece:   expected calibration error (Guo et al. 2017, eq. 3): Σ_b (n_b / n) |acc_b − conf_b| over
           `bins` equal-width bins of the confidence max(p, 1 − p) ∈ [0.5, 1]; acc_b the fraction of the
           bin's pairs whose more likely side is the chosen one.
    brier: (1/n) Σ (1 − p)², the Brier score of p against the label "chosen wins" (Brier 1950).
    """
    if gaps.numel() == 0:
        return {"ece": 0.0, "brier": 0.0}
    p = torch.sigmoid(gaps.double())
    conf = torch.maximum(p, 1 - p)
    right = (p > 0.5).double()
    index = ((conf - 0.5) * 2 * bins).floor().clamp(0, bins - 1).long()
    ece = 0.0
    for b in range(bins):
        member = index == b
        if member.any():
            ece += float(member.double().mean() * (right[member].mean() - conf[member].mean()).abs())
    return {"ece": ece, "brier": float(((1 - p) ** 2).mean())}


def evaluate_rm_run(run: Path, config: TrainConfig, data: str, batch_size: int = 8) -> dict[str, float]:
    """RUN/final of a `preftune train rm` run on the pairs of `data`: loss (the run's), pairwise
    accuracy, mean gap, ece, brier."""
    from preftune.data.formatting import load_tokenizer
    from preftune.reward.losses import parse_rm_loss
    from preftune.reward.scoring import load_scorer
    from preftune.reward.training import evaluate_pairs, rm_examples

    final = run / "final"
    tokenizer: Any = load_tokenizer(str(final))
    examples = rm_examples(data, config, tokenizer, None)
    model = load_scorer(final, dtype=config.dtype)
    loss_fn = parse_rm_loss(str(config.hparams.get("loss", "bt")))
    return {"pairs": float(len(examples)), **evaluate_pairs(model, examples, loss_fn, batch_size)}
