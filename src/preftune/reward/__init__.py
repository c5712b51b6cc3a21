"""Reward functions for online RL: built-in verifiers, user callables, weighted sums (docs/online.md).

from preftune import reward
r = reward.load_reward("arithmetic:1,mymod:brevity:0.5")
r(prompts, completions, answer=[...])    # float64 tensor [N]

Reward models (docs/reward_models.md): `load_scorer`, `branch_scores` (prefix-shared scalar scores),
losses (`parse_rm_loss`), ensemble aggregators and the LSC transform.
"""

from __future__ import annotations

from preftune.reward import builtin  # noqa: F401  (registers the built-in rewards)
from preftune.reward.ensemble import AGGREGATORS, aggregate, lsc, reference_score, summed_utilities
from preftune.reward.losses import PAIR_LOSSES, RMLoss, parse_rm_loss, regression
from preftune.reward.registry import (
    BUILTIN,
    Reward,
    RewardFn,
    RewardTerm,
    load_reward,
    load_reward_model,
    register_reward,
)
from preftune.reward.scoring import branch_scores, load_scorer

__all__ = [
    "AGGREGATORS",
    "BUILTIN",
    "PAIR_LOSSES",
    "RMLoss",
    "Reward",
    "RewardFn",
    "RewardTerm",
    "load_reward",
    "aggregate",
    "branch_scores",
    "load_reward_model",
    "load_scorer",
    "lsc",
    "parse_rm_loss",
    "reference_score",
    "register_reward",
    "regression",
    "summed_utilities",
]
