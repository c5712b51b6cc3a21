"""Online RL from rewards: advantage estimators (and, next to them, policy losses and rollouts).

from preftune import rl
rl.advantages("grpo", rewards, groups)           # [N] advantages, groups = prompt index per sample
rl.estimate("rloo", rewards, groups).metrics     # {"zero_signal_fraction": ..., ...}
rl.ESTIMATORS["remax"].paper                     # metadata: paper, equation, hyper-parameters
"""

from __future__ import annotations

from preftune.rl import estimators  # noqa: F401  (registers the estimators)
from preftune.rl.registry import REGISTRY as ESTIMATORS
from preftune.rl.registry import Estimate, EstimatorSpec, advantages, estimate
from preftune.rl.registry import get as get_estimator

__all__ = [
    "ESTIMATORS",
    "Estimate",
    "EstimatorSpec",
    "advantages",
    "estimate",
    "get_estimator",
]
