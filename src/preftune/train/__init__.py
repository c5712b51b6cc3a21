"""Training: `train(config) -> RunResult`, `evaluate(...)` (see api.py, docs/training.md).

`preftune.train(config)` works as the README shows: this package is callable (its module class
gets a `__call__`), so `preftune.train.api`, `preftune.train.loop`, ... stay importable as usual.
Imported lazily so that `preftune --help` (which imports train.commands) does not import torch.
"""

from __future__ import annotations

import sys
import types
from typing import Any

__all__ = ["RunResult", "evaluate", "train"]


def __getattr__(name: str) -> Any:
    if name in __all__:
        from preftune.train import api

        return getattr(api, name)
    raise AttributeError(f"module 'preftune.train' has no attribute '{name}'")


class _CallablePackage(types.ModuleType):
    def __call__(self, config: Any) -> Any:
        """`preftune.train(config)` = `preftune.train.api.train(config)`."""
        from preftune.train.api import train

        return train(config)


sys.modules[__name__].__class__ = _CallablePackage
