"""preftune: align generative models with preference and reward feedback.

import preftune
preftune.train(config)                      # a TrainConfig; see docs/training.md
preftune.losses.get("dpo")                  # a registered loss: function + metadata
preftune.losses.pairwise("ipo", pc, pr, rc, rr, chosen_lengths=lc, rejected_lengths=lr)
preftune.sequence_logps(model, prompt_ids, response_ids)   # prefix-shared, chunked log-probs

The names below are imported on first use (PEP 562), so that `import preftune` — and with it
`preftune --help` — does not import torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from preftune import losses, train
    from preftune.config import TrainConfig
    from preftune.errors import ConfigError, DataError, PreftuneError, TrainingError
    from preftune.models.logprobs import example_stats, sequence_logps
    from preftune.types import Example, PreferenceBatch, SequenceStats

_LAZY: dict[str, str] = {
    "losses": "preftune.losses",
    "train": "preftune.train",
    "TrainConfig": "preftune.config",
    "ConfigError": "preftune.errors",
    "DataError": "preftune.errors",
    "PreftuneError": "preftune.errors",
    "TrainingError": "preftune.errors",
    "example_stats": "preftune.models.logprobs",
    "sequence_logps": "preftune.models.logprobs",
    "Example": "preftune.types",
    "PreferenceBatch": "preftune.types",
    "SequenceStats": "preftune.types",
}

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


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'preftune' has no attribute '{name}'")
    loaded = importlib.import_module(module)
    value = loaded if module == f"preftune.{name}" else getattr(loaded, name)
    globals()[name] = value
    return value
