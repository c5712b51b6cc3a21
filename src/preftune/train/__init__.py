"""Training: `train(config) -> RunResult`, `evaluate(...)` (see api.py, docs/training.md).

Imported lazily so that `preftune --help` (which imports train.commands) does not import torch.
"""

from __future__ import annotations

from typing import Any

__all__ = ["RunResult", "evaluate", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from preftune.train import api

        return getattr(api, name)
    raise AttributeError(f"module 'preftune.train' has no attribute '{name}'")
