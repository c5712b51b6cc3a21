"""Shared units of the loss zoo: float32 views of a batch, masks, log-ratios, reward metrics.

Every loss computes in float32 whatever the model's dtype; entries of absent branches are replaced by
0 *before* any arithmetic so that padding (even inf/NaN) never reaches a loss or its gradient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from preftune.errors import ConfigError
from preftune.types import PreferenceBatch

# exp(x) is linearised above this value: exp(40) ≈ 2.4e17 keeps β·exp(·) and its gradient finite in
# float32 for log-ratios far beyond ±1e4 (docs/algorithms.md §6), while being exact where
# training lives.
EXP_LIMIT = 40.0


def branch_mask(batch: PreferenceBatch) -> torch.Tensor:
    """[E, K] bool, True where a branch exists."""
    if batch.mask is None:
        return torch.ones(batch.policy_logps.shape, dtype=torch.bool, device=batch.policy_logps.device)
    return batch.mask.to(torch.bool)


def valid_examples(batch: PreferenceBatch, branches: int) -> torch.Tensor:
    """[E] bool, True where the first `branches` branches of an example all exist."""
    mask = branch_mask(batch)
    if mask.shape[1] < branches:
        raise ConfigError(
            f"the loss needs {branches} branches per example, the batch has {mask.shape[1]}; "
            "check the data kind of the method"
        )
    return mask[:, :branches].all(dim=1)


def clean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """`x` in float32 with absent entries (mask False, broadcast over trailing dims) set to 0."""
    x = x.float()
    while mask.dim() < x.dim():
        mask = mask.unsqueeze(-1)
    return torch.where(mask, x, torch.zeros((), dtype=x.dtype, device=x.device))


def policy_logps(batch: PreferenceBatch) -> torch.Tensor:
    """[E, K] float32 policy log-probs, 0 for absent branches."""
    return clean(batch.policy_logps, branch_mask(batch))


def lengths(batch: PreferenceBatch) -> torch.Tensor:
    """[E, K] float32 response lengths |y|, at least 1 (absent branches count 1, never 0/0)."""
    return clean(batch.lengths, branch_mask(batch)).clamp(min=1.0)


def ref_logps(batch: PreferenceBatch, loss: str) -> torch.Tensor:
    """[E, K] float32 reference log-probs; ConfigError if the batch has none."""
    if batch.ref_logps is None:
        raise ConfigError(f"loss '{loss}' needs reference log-probs (batch.ref_logps is None)")
    return clean(batch.ref_logps, branch_mask(batch))


def log_ratios(batch: PreferenceBatch, loss: str) -> torch.Tensor:
    """[E, K] ρ = logp_θ − logp_ref in float32, 0 for absent branches."""
    return policy_logps(batch) - ref_logps(batch, loss)


def log_sigmoid(z: torch.Tensor) -> torch.Tensor:
    """log σ(z) = −softplus(−z), stable for |z| up to the float32 range."""
    return F.logsigmoid(z)


def safe_exp(x: torch.Tensor, limit: float = EXP_LIMIT) -> torch.Tensor:
    """exp(x) for x ≤ limit, continued by its tangent line above (finite value and gradient)."""
    xc = x.clamp(max=limit)
    return torch.exp(xc) * (1.0 + (x - xc))


def safe_expm1(x: torch.Tensor, limit: float = EXP_LIMIT) -> torch.Tensor:
    """e^x − 1 for x ≤ limit (accurate near 0, where exp(x) − 1 cancels), continued by its tangent line above."""
    xc = x.clamp(max=limit)
    return torch.expm1(xc) + torch.exp(xc) * (x - xc)


def wpo_weights(batch: PreferenceBatch) -> torch.Tensor:
    """[E] WPO pair weights w(y_w)·w(y_l) = exp(ℓ_w + ℓ_l), ℓ = logp_θ(y)/|y|, detached; 0 if masked.

    Zhou et al. 2024 (WPO: Enhancing RLHF with Weighted Preference Optimization, EMNLP; arXiv:2406.11827),
    the length-normalised sequence probability of each response under the current policy, which
    makes off-policy pairs count as if sampled on-policy. Not implemented: the paper's weight
    alignment, which divides each token's probability by Σ_v π_θ(v | ·)² (the form TRL 1.16's
    `use_weighting` applies) — a full-vocabulary statistic per token that preftune's chunked
    log-probs do not compute; without it the weights are smaller for flat token distributions.
    """
    valid = valid_examples(batch, 2)
    ell = policy_logps(batch)[:, :2].detach() / lengths(batch)[:, :2]
    zero = torch.zeros((), dtype=ell.dtype, device=ell.device)
    return torch.where(valid, torch.exp(ell.sum(dim=1)), zero)


def pair_metrics(reward_w: torch.Tensor, reward_l: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example implicit-reward metrics of a pair: chosen, rejected, margin, accuracy (margin > 0)."""
    reward_w, reward_l = reward_w.detach().float(), reward_l.detach().float()
    margin = reward_w - reward_l
    return {
        "rewards/chosen": reward_w,
        "rewards/rejected": reward_l,
        "rewards/margin": margin,
        "rewards/accuracy": (margin > 0).float(),
    }


def finish(
    losses: torch.Tensor, valid: torch.Tensor, metrics: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Zero the losses and metrics of invalid (masked-out) examples; metrics detached float32."""
    zero = torch.zeros((), dtype=torch.float32, device=losses.device)
    losses = torch.where(valid, losses.float(), zero)
    return losses, {k: torch.where(valid, v.detach().float(), zero) for k, v in metrics.items()}
