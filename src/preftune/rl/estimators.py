"""Advantage estimators: pure functions of a batch's rewards grouped by prompt.

Each takes rewards [N] (float) and `Groups` (see `preftune.rl.groups`) and returns advantages [N] in
the rewards' dtype. Notation: group g of prompt x holds G samples with rewards r_1..r_G; mean_g, std_g
are that group's mean and unbiased standard deviation.
"""

from __future__ import annotations

import math

import torch

from preftune.errors import ConfigError
from preftune.losses.registry import HParam
from preftune.rl.groups import Groups
from preftune.rl.registry import register

EPS = HParam(1e-4, "added to the standard deviation before dividing", low=0.0)


def _centred(rewards: torch.Tensor, groups: Groups) -> torch.Tensor:
    return rewards - groups.mean(rewards)[groups.index]


@register(
    "grpo",
    paper="Shao et al. 2024, DeepSeekMath (GRPO), §4.1.2 outcome supervision",
    equation="A_i = (r_i − mean_g r) / (std_g r + ε)",
    hparams={
        "scale": HParam(
            "group",
            "divide by the group's std, the batch's std, or not at all",
            choices=("group", "batch", "none"),
        ),
        "eps": EPS,
    },
    min_group=2,
)
def grpo(rewards: torch.Tensor, groups: Groups, *, scale: str, eps: float) -> torch.Tensor:
    """GRPO: group-relative reward, scaled by the group's (or the batch's) unbiased std.

    DeepSeekMath §4.1.2: Â_{i,t} = r̃_i = (r_i − mean(r)) / std(r) over the G outputs of one question;
    std is the unbiased (G − 1) estimate and ε = 1e-4 keeps all-equal groups at 0, as in TRL's
    GRPOTrainer. `scale="batch"` divides by the std of all N rewards (TRL's `scale_rewards="batch"`),
    `scale="none"` is Dr. GRPO. A group of one sample has std 0 and advantage 0.
    """
    centred = _centred(rewards, groups)
    if scale == "none":
        return centred
    if scale == "batch":
        std = rewards.std() if rewards.numel() > 1 else rewards.new_zeros(())
        return centred / (std + eps)
    return centred / (groups.std(rewards)[groups.index] + eps)


@register(
    "dr_grpo",
    paper="Liu et al. 2025, Understanding R1-Zero-Like Training (Dr. GRPO), eq. 3 / Appendix A",
    equation="A_i = r_i − mean_g r",
    min_group=2,
)
def dr_grpo(rewards: torch.Tensor, groups: Groups) -> torch.Tensor:
    """Dr. GRPO: the group mean as baseline, no division by the std (removes GRPO's difficulty bias).

    The mean includes r_i itself, so E[A_i ∇log π(y_i)] = (G − 1)/G · ∇J: a scaled true gradient.
    """
    return _centred(rewards, groups)


@register(
    "rloo",
    paper="Kool et al. 2019, Buy 4 REINFORCE Samples; Ahmadian et al. 2024, Back to Basics (RLOO)",
    equation="A_i = r_i − (Σ_{j≠i} r_j) / (G − 1)",
    min_group=2,
)
def rloo(rewards: torch.Tensor, groups: Groups) -> torch.Tensor:
    """RLOO: each sample's baseline is the mean reward of the other G − 1 samples of its prompt.

    The baseline is independent of y_i, so E[A_i ∇log π(y_i)] = ∇J exactly (unbiased). Equals
    G/(G − 1) · (r_i − mean_g r). A group of one sample has no baseline: its advantage is 0.
    """
    count = groups.count.to(rewards.dtype)[groups.index]
    scale = torch.where(count > 1, count / (count - 1).clamp(min=1), torch.zeros_like(count))
    return _centred(rewards, groups) * scale


@register(
    "remax",
    paper="Li et al. 2023, ReMax, Algorithm 1 (greedy-response baseline)",
    equation="A_i = clip(r(x, y_i) − r(x, ȳ), −c, c), ȳ = greedy response of x",
    hparams={"clip": HParam(5.0, "clip the advantage to [−clip, clip]", low=0.0, low_open=True)},
    inputs={"baseline_rewards": "the reward of each prompt's greedy response, indexed by prompt index"},
    required=("baseline_rewards",),
)
def remax(
    rewards: torch.Tensor, groups: Groups, *, baseline_rewards: torch.Tensor, clip: float
) -> torch.Tensor:
    """ReMax: REINFORCE with the reward of the prompt's greedy response as baseline.

    `baseline_rewards[p]` is r(x_p, ȳ_p) for prompt index p (the values in `groups`). The greedy
    response does not depend on the samples, so the estimator is unbiased (before clipping). ReMax's
    per-token KL penalty −β(log π − log π_ref) is added to the return by `preftune.rl.kl_penalty`.
    """
    base = baseline_rewards.to(device=rewards.device, dtype=rewards.dtype).reshape(-1)
    if int(groups.ids.min()) < 0 or int(groups.ids.max()) >= base.numel():
        raise ConfigError(
            f"estimator 'remax': baseline_rewards has {base.numel()} values but the prompt indices in "
            f"groups run from {int(groups.ids.min())} to {int(groups.ids.max())}; give one per prompt index"
        )
    if not bool(torch.isfinite(base).all()):
        raise ConfigError("estimator 'remax': baseline_rewards must be finite")
    return (rewards - base[groups.ids[groups.index]]).clamp(-clip, clip)


def _whiten(x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(x − mean) / sqrt(max(var, 1e-8)) over the batch (masked entries only), biased variance."""
    m = torch.ones_like(x, dtype=torch.bool) if mask is None else mask.to(torch.bool)
    values = x[m]
    mean = values.mean()
    var = ((values - mean) ** 2).mean()
    return torch.where(m, (x - mean) * var.clamp(min=1e-8).rsqrt(), torch.zeros_like(x))


def _returns(
    rewards: torch.Tensor, token_rewards: torch.Tensor | None, mask: torch.Tensor | None, gamma: float
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Per-token discounted returns G_t = Σ_{s≥t} γ^{s−t} r_s (scalar reward at the last token) when a
    token mask is given; else the scalar rewards."""
    if mask is None:
        if token_rewards is not None:
            raise ConfigError("estimator: token_rewards= needs mask= (the [N, T] response-token mask)")
        return rewards, None
    mask = mask.to(device=rewards.device, dtype=torch.bool)
    if mask.dim() != 2 or mask.shape[0] != rewards.shape[0]:
        raise ConfigError(
            f"estimator: mask must be [N, T] with N = {rewards.shape[0]}, got {tuple(mask.shape)}"
        )
    per_token = torch.zeros(mask.shape, dtype=rewards.dtype, device=rewards.device)
    if token_rewards is not None:
        if token_rewards.shape != mask.shape:
            raise ConfigError(
                f"estimator: token_rewards {tuple(token_rewards.shape)} must match mask {tuple(mask.shape)}"
            )
        per_token = torch.where(mask, token_rewards.to(per_token), per_token)
    last = (mask.long().sum(dim=1) - 1).clamp(min=0)
    per_token[torch.arange(len(last)), last] += torch.where(
        mask.any(dim=1), rewards, torch.zeros_like(rewards)
    )
    out = torch.zeros_like(per_token)
    running = torch.zeros_like(rewards)
    for t in range(mask.shape[1] - 1, -1, -1):
        running = per_token[:, t] + gamma * running
        out[:, t] = running
    return out * mask, mask


_PP_HPARAMS = {"gamma": HParam(1.0, "discount of the per-token return", low=0.0, high=1.0)}
_PP_INPUTS = {
    "token_rewards": "optional [N, T] per-token rewards, e.g. −β·KL from rl.kl_penalty",
    "mask": "optional [N, T] response-token mask; with it the advantages are per token [N, T]",
}


@register(
    "reinforce_pp",
    paper="Hu et al. 2025, REINFORCE++ (global advantage normalisation)",
    equation="A_t = (G_t − mean_batch G) / std_batch G,  G_t = Σ_{s≥t} γ^{s−t} r_s",
    hparams=_PP_HPARAMS,
    inputs=_PP_INPUTS,
)
def reinforce_pp(
    rewards: torch.Tensor,
    groups: Groups,
    *,
    gamma: float,
    token_rewards: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE++: discounted return, then whitening over the whole batch (no per-prompt baseline).

    With `mask=` the return is per token (the scalar reward sits on each response's last token, plus
    `token_rewards` such as the KL penalty) and whitening runs over all response tokens of the batch,
    as OpenRLHF does; without it the advantages are the whitened scalar rewards [N].
    """
    returns, m = _returns(rewards, token_rewards, mask, gamma)
    return _whiten(returns, m)


@register(
    "reinforce_pp_baseline",
    paper="Hu et al. 2025, REINFORCE++-baseline (group mean, then global normalisation)",
    equation="A_t = whiten_batch(G_t) with r_i ← r_i − mean_g r",
    hparams=_PP_HPARAMS,
    inputs=_PP_INPUTS,
    min_group=2,
)
def reinforce_pp_baseline(
    rewards: torch.Tensor,
    groups: Groups,
    *,
    gamma: float,
    token_rewards: torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """REINFORCE++-baseline: subtract the group mean reward, then as `reinforce_pp`."""
    returns, m = _returns(_centred(rewards, groups), token_rewards, mask, gamma)
    return _whiten(returns, m)


def _beta_log_density(p: torch.Tensor, a: float, b: float) -> torch.Tensor:
    log_norm = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b)
    return (
        log_norm + torch.xlogy(torch.full_like(p, a - 1), p) + torch.xlogy(torch.full_like(p, b - 1), 1 - p)
    )


def _bnpo_column(rewards: torch.Tensor, groups: Groups, max_weight: float) -> torch.Tensor:
    p_hat = groups.mean(rewards)  # [P]
    mu = float(p_hat.mean())
    var = float(((p_hat - mu) ** 2).mean())
    alpha = beta = 1.0
    if var > 0 and 0 < mu < 1:
        k = mu * (1 - mu) / var - 1
        alpha, beta = max(1 + k * mu / 3, 1.0), max(1 + k * (1 - mu) / 3, 1.0)
    weight = torch.exp(-_beta_log_density(p_hat.double(), alpha, beta)).clamp(0.0, max_weight)
    return (rewards - p_hat[groups.index]) * weight.to(rewards.dtype)[groups.index]


@register(
    "bnpo",
    paper="Xiao et al. 2025, BNPO: Beta Normalization Policy Optimization (Beta-normalised advantage)",
    equation="A_i = (r_i − p̂_g) / f_Beta(p̂_g; α, β), α = max(1 + a/3, 1), β = max(1 + b/3, 1)",
    hparams={"max_weight": HParam(1e6, "clamp of the weight 1/f_Beta", low=0.0, low_open=True)},
    columns=True,
    min_group=2,
)
def bnpo(rewards: torch.Tensor, groups: Groups, *, max_weight: float) -> torch.Tensor:
    """BNPO: group-centred binary rewards divided by a Beta density fitted to the batch's success rates.

    p̂_g is the group's mean reward (its success rate). Over the P groups of the batch, a Beta is fitted
    by moments: μ, σ² (population variance) of p̂, k = μ(1 − μ)/σ² − 1, a = kμ, b = k(1 − μ); the
    normalising density uses α = max(1 + a/3, 1), β = max(1 + b/3, 1). The weight 1/f_Beta(p̂_g) is
    clamped to [0, max_weight]. When the p̂ have no spread (σ² = 0) or μ ∈ {0, 1} the fit is
    undefined and α = β = 1 (weight 1). Implemented from the paper's text; rewards [N, C] with several
    components are normalised per component and then averaged.
    """
    if rewards.dim() == 1:
        return _bnpo_column(rewards, groups, max_weight)
    cols = [_bnpo_column(c.contiguous(), groups, max_weight) for c in rewards.unbind(dim=1)]
    return torch.stack(cols, dim=1).mean(dim=1)


@register(
    "global_mean",
    paper="Xiong et al. 2025, Reinforce-Ada (baseline over every sample drawn for the prompt)",
    equation="A_i = r_i − mean(pool of x)",
    inputs={
        "pool_rewards": "rewards of every sample drawn for the prompts (all rounds); default: rewards",
        "pool_groups": "the pool's prompt indices (required with pool_rewards)",
    },
    min_group=2,
)
def global_mean(
    rewards: torch.Tensor,
    groups: Groups,
    *,
    pool_rewards: torch.Tensor | None = None,
    pool_groups: torch.Tensor | None = None,
) -> torch.Tensor:
    """Reinforce-Ada's baseline: the mean reward of the prompt's whole sample pool across rounds.

    After adaptive sampling only a (balanced) subset of the pool is trained on; its baseline stays the
    mean over all samples drawn for x. Without a pool this is `dr_grpo`.
    """
    if pool_rewards is None:
        return _centred(rewards, groups)
    if pool_groups is None or pool_groups.shape != pool_rewards.shape or pool_rewards.dim() != 1:
        raise ConfigError(
            "estimator 'global_mean': pool_groups must be given, one prompt index per pool reward"
        )
    pool = pool_rewards.to(rewards)
    ids = groups.ids.to(pool_groups.device)
    sums = torch.zeros(len(ids), dtype=pool.dtype).index_add(0, torch.searchsorted(ids, pool_groups), pool)
    known = torch.isin(pool_groups, ids)
    if not bool(known.all()) or not bool(torch.isin(ids, pool_groups).all()):
        raise ConfigError(
            "estimator 'global_mean': every prompt of the batch needs samples in the pool, and only those"
        )
    counts = torch.bincount(torch.searchsorted(ids, pool_groups), minlength=len(ids)).to(pool.dtype)
    return rewards - (sums / counts)[groups.index]


@register(
    "positive_only",
    paper="Xiong et al. 2025, A Minimalist Approach to LLM Reasoning (RAFT++)",
    equation="A_i = max(r_i, 0)",
)
def positive_only(rewards: torch.Tensor, groups: Groups) -> torch.Tensor:
    """RAFT++: train only on positively rewarded samples (rejection sampling as a policy gradient with
    PPO-clip ratios); negative rewards get advantage 0."""
    return rewards.clamp(min=0)
