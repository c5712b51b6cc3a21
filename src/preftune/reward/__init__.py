"""Reward functions for online RL: built-in verifiers, user callables, weighted sums (docs/online.md).

from preftune import reward
r = reward.load_reward("arithmetic:1,mymod:brevity:0.5")
r(prompts, completions, answer=[...])    # float64 tensor [N]
"""

from __future__ import annotations

from preftune.reward import builtin  # noqa: F401  (registers the built-in rewards)
from preftune.reward.registry import (
    BUILTIN,
    Reward,
    RewardFn,
    RewardTerm,
    load_reward,
    load_reward_model,
    register_reward,
)

__all__ = [
    "BUILTIN",
    "Reward",
    "RewardFn",
    "RewardTerm",
    "load_reward",
    "load_reward_model",
    "register_reward",
]
