"""Diffusion ODE solvers as `diffusers` scheduler classes, and their exact test bed.

Use any of them in a pipeline with ``pipe.scheduler = X.from_config(pipe.scheduler.config)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

__all__ = ["new_configurations"]


def new_configurations() -> dict[str, Callable[[], Any]]:
    """The schedulers this package adds, on SD's config, for the exact benchmark."""
    return {}
