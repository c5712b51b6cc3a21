"""preftune: align generative models with preference and reward feedback."""

from __future__ import annotations

__version__ = "0.1.0"

from preftune.errors import ConfigError, DataError, PreftuneError, TrainingError  # noqa: E402
from preftune.types import Example, PreferenceBatch, SequenceStats  # noqa: E402

__all__ = [
    "ConfigError",
    "DataError",
    "Example",
    "PreferenceBatch",
    "PreftuneError",
    "SequenceStats",
    "TrainingError",
    "__version__",
]
