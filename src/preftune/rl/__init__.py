"""Online RL from rewards: advantage estimators, policy losses, the rollout engine (docs/online.md).

from preftune import rl
rl.advantages("grpo", rewards, groups)           # [N] advantages, groups = prompt index per sample
rl.estimate("rloo", rewards, groups).metrics     # {"zero_signal_fraction": ..., ...}
rl.ESTIMATORS["remax"].paper                     # metadata: paper, equation, hyper-parameters
rl.SAMPLERS["reinforce_ada"].hparams             # samplers: which prompts, how many samples, which groups
terms = rl.parse_policy_objective("ppo_clip:1,kl:0.04")   # policy loss terms (kind "policy")
"""

from __future__ import annotations

from preftune.losses.policy_losses import (
    AGGREGATIONS,
    POLICY_LOSSES,
    PolicyBatch,
    get_policy,
    global_denominators,
    kl_penalty,
    kl_tokens,
    local_denominator,
    parse_policy_objective,
    policy_objective,
)
from preftune.rl import adaptive, estimators, gae  # noqa: F401  (register the samplers and estimators)
from preftune.rl.registry import REGISTRY as ESTIMATORS
from preftune.rl.registry import Estimate, EstimatorSpec, advantages, estimate
from preftune.rl.registry import get as get_estimator
from preftune.rl.rollout import RolloutEngine, Rollouts
from preftune.rl.samplers import SAMPLERS, Sampler, Selection, get_sampler, make_sampler
from preftune.rl.sampling import Sampling

__all__ = [
    "AGGREGATIONS",
    "POLICY_LOSSES",
    "PolicyBatch",
    "RolloutEngine",
    "Rollouts",
    "SAMPLERS",
    "Sampler",
    "Selection",
    "get_sampler",
    "make_sampler",
    "Sampling",
    "get_policy",
    "global_denominators",
    "kl_penalty",
    "kl_tokens",
    "local_denominator",
    "parse_policy_objective",
    "policy_objective",
    "ESTIMATORS",
    "Estimate",
    "EstimatorSpec",
    "advantages",
    "estimate",
    "get_estimator",
]
