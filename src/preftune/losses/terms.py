"""Terms that are not preference losses on their own but join an objective (e.g. `dpo:1,sft:0.2`)."""

from __future__ import annotations

import torch

from preftune.losses.core import finish, policy_logps, valid_examples
from preftune.losses.registry import LossOutput, register
from preftune.types import PreferenceBatch


@register(
    "sft",
    kind="any",
    needs_reference=False,
    paper="Supervised fine-tuning: negative log-likelihood of the preferred response",
    equation="NLL = −Σ_t log π_θ(y_t | x, y_<t)",
    reduction="token",
)
def sft(batch: PreferenceBatch, state: dict[str, torch.Tensor]) -> LossOutput:
    """SFT: per-example summed NLL −logp_θ(y) of branch 0 (chosen / desirable / best-ranked).

    reduction="token": the trainer divides Σ_examples by the global count of the tokens this term
    sums over (`sft_token_count`), so the objective is the per-token NLL of the whole batch
    (docs/algorithms.md §6). When the batch has labels (unpaired 1/0, or a pairwise soft label p) only
    examples with label > 0.5 count: raising the likelihood of an undesirable completion, or of a
    "chosen" response the label says is worse, would train the wrong way.
    """
    valid = sft_examples(batch)
    losses = -policy_logps(batch)[:, 0]
    per_token = losses.detach() / batch.lengths[:, 0].float().clamp(min=1)
    losses, metrics = finish(losses, valid, {"sft/nll_per_token": per_token})
    return LossOutput(losses, metrics, {})


def sft_examples(batch: PreferenceBatch) -> torch.Tensor:
    """[E] bool: examples whose branch 0 the sft term trains on (present, and label > 0.5 if labelled)."""
    valid = valid_examples(batch, 1)
    if batch.labels is not None:
        valid = valid & (batch.labels.float() > 0.5)
    return valid


def sft_token_count(batch: PreferenceBatch) -> torch.Tensor:
    """Scalar: number of response tokens the sft term sums over in this batch (for the global count)."""
    return (batch.lengths[:, 0].float() * sft_examples(batch).float()).sum()
