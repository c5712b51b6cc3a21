"""What preftune's schedulers share: the β schedule, the noise levels, the step counter and the
calibration results kept in the scheduler's config.

Two kinds of scheduler build on it. Those written from scratch (DPM-Solver-v3, USF, the time-shift
sampler) derive from :class:`PreftuneScheduler`, a ``SchedulerMixin``/``ConfigMixin`` with the β
schedule, ``timesteps``, the step index, ``scale_model_input`` and ``__len__`` already set up. Those
that extend a diffusers scheduler (DC-Solver on UniPC, the searched-step DPM-Solver++) mix in
:class:`CalibratedMixin` for the log-levels and :meth:`CalibratedMixin.keep` only.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin

__all__ = ["CalibratedMixin", "ModelFn", "PreftuneScheduler", "log_levels", "train_alphas_cumprod"]

# model_fn(x, t) → ε for VP samples x at a possibly fractional timestep t
ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

# diffusers' mixins are typed loosely (config is a FrozenDict read by attribute): seen as Any by mypy
_SchedulerBase: Any = SchedulerMixin
_ConfigBase: Any = ConfigMixin


def train_alphas_cumprod(
    num_train_timesteps: int,
    beta_start: float,
    beta_end: float,
    beta_schedule: str,
    trained_betas: list[float] | None,
) -> torch.Tensor:
    """ᾱ_t in float64 for diffusers' ``linear`` / ``scaled_linear`` β schedules or given betas."""
    if trained_betas is not None:
        betas = torch.tensor(trained_betas, dtype=torch.float64)
    elif beta_schedule == "linear":
        betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
    elif beta_schedule == "scaled_linear":
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
    else:
        raise ValueError(f"beta_schedule {beta_schedule!r} is not supported: use 'linear' or 'scaled_linear'")
    return torch.cumprod(1.0 - betas, dim=0)


def log_levels(alphas_cumprod: Any) -> np.ndarray:
    """``log s`` with ``s = σ/α = sqrt((1 − ᾱ)/ᾱ)`` per integer timestep (increasing in t), float64."""
    ac = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
    return np.log(np.sqrt((1 - ac) / ac))


class CalibratedMixin:
    """Log-levels of the training schedule and config storage of calibration results."""

    alphas_cumprod: torch.Tensor
    config: Any
    register_to_config: Callable[..., None]

    def _log_levels(self) -> np.ndarray:
        return log_levels(self.alphas_cumprod)

    def keep(self, **values: Any) -> None:
        """Store calibration results in the config, so ``save_pretrained`` and
        ``from_config(dict(scheduler.config))`` keep them (they are no longer defaults)."""
        defaults = [k for k in self.config.get("_use_default_values", []) if k not in values]
        self.register_to_config(**values, _use_default_values=defaults)


class PreftuneScheduler(CalibratedMixin, _SchedulerBase, _ConfigBase):
    """Base of the schedulers written from scratch: β schedule, step counter, pipeline hooks."""

    order = 1

    def _init_schedule(
        self,
        num_train_timesteps: int,
        beta_start: float,
        beta_end: float,
        beta_schedule: str,
        trained_betas: list[float] | None,
    ) -> None:
        """Set ``alphas_cumprod``, ``log_levels``, the full ``timesteps`` and a reset step counter."""
        self.alphas_cumprod = train_alphas_cumprod(
            num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas
        )
        self.log_levels = log_levels(self.alphas_cumprod)
        self.init_noise_sigma = 1.0
        self.num_inference_steps: int | None = None
        self.timesteps = torch.arange(num_train_timesteps - 1, -1, -1, dtype=torch.long)
        self._index = 0

    def _t_of(self, level: float) -> float:
        """The fractional timestep of noise level ``s`` (``log s`` interpolated linearly)."""
        return float(np.interp(math.log(level), self.log_levels, np.arange(len(self.log_levels))))

    def _next_index(self) -> int:
        """The index of the step about to run; an error before ``set_timesteps``."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps(num_inference_steps) before step()")
        return self._index

    def scale_model_input(self, sample: torch.Tensor, timestep: Any = None) -> torch.Tensor:
        return sample

    def __len__(self) -> int:
        return int(self.config.num_train_timesteps)
