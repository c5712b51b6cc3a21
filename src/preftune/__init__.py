"""preftune: align generative models with preference and reward feedback.

import preftune
preftune.train(config)                      # a TrainConfig; see docs/training.md
preftune.losses.get("dpo")                  # a registered loss: function + metadata
preftune.losses.pairwise("ipo", pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
preftune.sequence_logps(model, prompt_ids, response_ids)   # prefix-shared, chunked log-probs
"""

from __future__ import annotations

__version__ = "0.1.0"

from preftune import losses, train  # noqa: E402  (train is a callable package: preftune.train(config))
from preftune.config import TrainConfig  # noqa: E402
from preftune.errors import ConfigError, DataError, PreftuneError, TrainingError  # noqa: E402
from preftune.models.logprobs import example_stats, sequence_logps  # noqa: E402
from preftune.types import Example, PreferenceBatch, SequenceStats  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "Example",
    "PreferenceBatch",
    "PreftuneError",
    "SequenceStats",
    "TrainConfig",
    "TrainingError",
    "__version__",
    "example_stats",
    "losses",
    "sequence_logps",
    "train",
]
