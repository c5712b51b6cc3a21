"""Online methods as presets: a name expands to an advantage estimator and a policy objective.

    preftune train grpo ...                      estimator grpo, objective ppo_clip:1 (token mean)
    preftune train grpo --estimator rloo --objective "ppo_clip:1,kl:0.01"   every part overridable

Defaults follow TRL 1.16's GRPOConfig where it has one: β = 0 (no KL term, no reference model),
`loss_type="dapo"` (token mean over the global batch), ε = 0.2, 8 generations, temperature 1,
512 new tokens at most. This module imports no torch (the CLI's `--help` reads it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class OnlinePreset:
    """What an online method name expands to (each part overridable by config keys)."""

    estimator: str
    objective: str
    hparams: dict[str, Any] = field(default_factory=dict)  # defaults of the objective's terms
    greedy_baseline: bool = False  # ReMax: one greedy response per prompt scores the baseline
    paper: str = ""
    macro: str | None = None  # MA-RLHF's macro-action termination (estimator gae)
    kl_coef: float = 0.05  # PPO family: the KL penalty in the token rewards (TRL's PPOConfig default)
    sampler: str = "uniform"  # which prompts, how many samples, which groups (preftune.rl.samplers)
    sampler_args: dict[str, Any] = field(default_factory=dict)
    # how the scored samples become examples (preftune.rl.builders); "" = groups for a policy objective.
    # With a builder the objective is a weighted sum of offline losses (dpo, sft, copg, ...) and the
    # estimator is unused.
    builder: str = ""


PRESETS: dict[str, OnlinePreset] = {
    "grpo": OnlinePreset(
        "grpo", "ppo_clip:1", paper="Shao et al. 2024, DeepSeekMath §4.1 (TRL 1.16 defaults: β 0, dapo)"
    ),
    "dr_grpo": OnlinePreset(
        "dr_grpo",
        "ppo_clip:1",
        {"aggregation": "seq_mean_token_sum_norm"},
        paper="Liu et al. 2025, Dr. GRPO (no std scaling, division by N · max_len)",
    ),
    "rloo": OnlinePreset("rloo", "ppo_clip:1", paper="Ahmadian et al. 2024, RLOO (leave-one-out baseline)"),
    "remax": OnlinePreset(
        "remax", "pg:1", greedy_baseline=True, paper="Li et al. 2023, ReMax Alg. 1 (greedy baseline)"
    ),
    "reinforce_pp": OnlinePreset(
        "reinforce_pp", "ppo_clip:1", paper="Hu et al. 2025, REINFORCE++ (batch-whitened returns)"
    ),
    "bnpo": OnlinePreset("bnpo", "ppo_clip:1", paper="Xiao et al. 2025, BNPO (Beta-normalised advantages)"),
    # PPO family: a value head on the policy, token rewards (KL penalty + the reward at the end), GAE
    "ppo": OnlinePreset(
        "gae", "ppo_clip:1,value:1", paper="Schulman et al. 2017, PPO; Ouyang et al. 2022 (RLHF PPO, TRL)"
    ),
    "ma_ppo": OnlinePreset(
        "gae", "ppo_clip:1,value:1", macro="fixed", paper="Chai et al. 2025, MA-RLHF (macro actions)"
    ),
    "rto": OnlinePreset(
        "gae", "ppo_clip:1,value:1", kl_coef=0.01, paper="Zhong et al. 2024, RTO (DPO token rewards + PPO)"
    ),
    "dapo": OnlinePreset(
        "grpo",
        "ppo_clip:1",
        {"eps_high": 0.28},
        sampler="dapo_filter",
        paper="Yu et al. 2025, DAPO: clip-higher ε_high 0.28, token mean, dynamic sampling (no overlong shaping)",
    ),
    "reinforce_ada": OnlinePreset(
        "global_mean",
        "ppo_clip:1",
        sampler="reinforce_ada",
        paper="Xiong et al. 2025, Reinforce-Ada (balance exit, pool-mean baseline)",
    ),
    "gvm": OnlinePreset(
        "positive_only",
        "ppo_clip:1",
        sampler="gvm",
        paper="Yao et al. 2025, GVM-RAFT++ (two-stage budget allocation, RAFT++ on top)",
    ),
    "vade": OnlinePreset(
        "grpo",
        "ppo_clip:1",
        sampler="vade",
        paper="VADE: GRPO on Thompson-selected prompts (Beta posteriors)",
    ),
    "raft": OnlinePreset(
        "", "sft", paper="Dong et al. 2023, RAFT (best-of-K, then SFT)", builder="best_of_k"
    ),
    "raft_pp": OnlinePreset(
        "positive_only", "ppo_clip:1", paper="Xiong et al. 2025, RAFT++ (positive samples, PPO-clip ratios)"
    ),
    "copg": OnlinePreset(
        "", "copg_loss", paper="Flet-Berliac et al. 2024, Contrastive Policy Gradient", builder="groups"
    ),
    "online_dpo": OnlinePreset(
        "",
        "dpo",
        paper="Guo et al. 2024, online DPO (best vs worst sample, any pairwise loss)",
        builder="best_worst",
    ),
    "dno": OnlinePreset("", "dpo", paper="Rosset et al. 2024, DNO-Prct (teacher in the pool)", builder="dno"),
    "xpo": OnlinePreset(
        "", "xpo_loss", paper="Xie et al. 2024, XPO (α·log π_θ(ỹ), ỹ ~ π_ref)", builder="xpo"
    ),
}

# the generation budget of an online run when max_completion_length is not set (TRL 1.16's default)
DEFAULT_COMPLETION_LENGTH = 512


def is_online(method: str) -> bool:
    """Whether `method` names an online preset (grpo, rloo, ...)."""
    return method.strip() in PRESETS


def preset_sampler(
    method: str, sampler: str | None, sampler_args: dict[str, Any] | None
) -> tuple[str, dict[str, Any]]:
    """(sampler name, its options) of online `method`: `sampler` overrides the preset's; the preset's
    options apply only to its own sampler."""
    preset = PRESETS[method.strip()]
    name = sampler or preset.sampler
    base = dict(preset.sampler_args) if name == preset.sampler else {}
    return name, {**base, **(sampler_args or {})}


def expand(
    method: str, estimator: str | None, objective: str | None
) -> tuple[str, str, dict[str, Any], bool]:
    """(estimator, objective text, term defaults, greedy baseline) of online `method`, with overrides.

    The preset's term defaults (e.g. Dr. GRPO's aggregation) apply only to its own objective."""
    preset = PRESETS[method.strip()]
    est = estimator or preset.estimator
    defaults = dict(preset.hparams) if objective is None else {}
    return est, objective or preset.objective, defaults, preset.greedy_baseline or est == "remax"


def builder_of(method: str) -> str:
    """The example builder of online `method` ("" for the policy-gradient presets)."""
    return PRESETS[method.strip()].builder
