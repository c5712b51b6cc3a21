"""The time-shift sampler (Li et al. ICLR 2024, arXiv 2305.15583) on DDIM, as a diffusers scheduler.

Exposure bias: during sampling the network sees ``x̂_t`` produced by earlier (imperfect) steps, not
the forward-process ``x_t`` it was trained on. Li et al. observe that another timestep ``t_s`` near
``t`` often fits ``x̂_t`` better, and choose it by matching noise levels: after each DDIM step
(Song et al. 2021, arXiv 2010.02502, eq. 12, η = 0) to the nominal next timestep ``t``, the sampler
computes the variance ``σ̂²`` of the new sample and, while ``t`` is above a cutoff ``t_c``, replaces
``t`` by the ``t_s`` in the window ``[t − w/2, t + w/2]`` whose forward-process variance
``1 − ᾱ_{t_s}`` is closest to ``σ̂²`` (the paper's Algorithm "TS-DDIM"). The next network call and
the next DDIM step then use ``t_s``. Below the cutoff it is plain DDIM.

Choices made here (the paper leaves them open or we could not confirm them from its text):
``σ̂²`` is the variance over all elements of the batch (one shifted timestep per batch, because a
diffusers pipeline passes one ``t`` to the network); ``window_size`` 40 and ``cutoff_timestep`` 300
are defaults of this class, not tuned values from the paper; the window is limited to timesteps
below the current one, so time always decreases.

How a pipeline sees the shift: diffusers pipelines iterate over ``scheduler.timesteps`` and hand each
``t`` to the network. ``step`` writes the shifted ``t_s`` into that tensor in place, so the loop's
next ``t`` (a view of the same storage) is ``t_s``.

With an exact noise predictor there is no exposure bias to correct, so on the Gaussian-mixture bed
(docs/solvers.md) the shift can only move the sample off the exact ODE trajectory; the sampler is
meant for trained networks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from preftune.diffusion.schedulers.base import PreftuneScheduler

__all__ = ["TimeShiftDDIMScheduler"]


class TimeShiftDDIMScheduler(PreftuneScheduler):
    """Deterministic DDIM with Li et al.'s time-shift rule; ``window_size=0`` is exactly DDIM."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        set_alpha_to_one: bool = False,
        steps_offset: int = 0,
        clip_sample: bool = False,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        window_size: int = 40,
        cutoff_timestep: int = 300,
    ) -> None:
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if clip_sample:
            raise ValueError("clip_sample=True is not supported by the time-shift sampler: set it to False")
        if prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ValueError(f"prediction_type {prediction_type!r}: use epsilon, v_prediction or sample")
        self.final_alpha_cumprod = torch.tensor(1.0) if set_alpha_to_one else self.alphas_cumprod[0]
        self._nominal: list[int] = []

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The DDIM grid for ``num_inference_steps`` steps (``leading``, ``trailing`` or ``linspace``)."""
        n, total = num_inference_steps, self.config.num_train_timesteps
        spacing = self.config.timestep_spacing
        if spacing == "leading":
            grid = (np.arange(n) * (total // n)).round()[::-1] + self.config.steps_offset
        elif spacing == "trailing":
            grid = np.round(np.arange(total, 0, -total / n)) - 1
        elif spacing == "linspace":
            grid = np.linspace(0, total - 1, n).round()[::-1]
        else:
            raise ValueError(f"timestep_spacing {spacing!r}: use leading, trailing or linspace")
        self.num_inference_steps = n
        self._nominal = [int(t) for t in grid]
        self.timesteps = torch.tensor(self._nominal, dtype=torch.long, device=device)
        self._index = 0

    def _x0_eps(self, out: torch.Tensor, t: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alphas_cumprod[t].to(x.dtype)
        kind = self.config.prediction_type
        if kind == "epsilon":
            return (x - (1 - a).sqrt() * out) / a.sqrt(), out
        if kind == "sample":
            return out, (x - a.sqrt() * out) / (1 - a).sqrt()
        return a.sqrt() * x - (1 - a).sqrt() * out, a.sqrt() * out + (1 - a).sqrt() * x

    def shifted(self, sample: torch.Tensor, nominal: int, current: int) -> int:
        """Li et al.'s choice: the timestep in the window whose ``1 − ᾱ`` is nearest ``Var(sample)``."""
        half = self.config.window_size // 2
        lo, hi = max(nominal - half, 0), min(nominal + half, current - 1)
        if self.config.window_size <= 0 or nominal <= self.config.cutoff_timestep or hi < lo:
            return nominal
        candidates = torch.arange(lo, hi + 1)
        var = float(sample.double().var())
        gap = (1 - self.alphas_cumprod[candidates] - var).abs()
        return int(candidates[int(torch.argmin(gap))])

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One DDIM step from ``timestep`` (possibly shifted) to the next timestep, then the shift."""
        i, t = self._next_index(), int(timestep)
        last = i + 1 >= len(self._nominal)
        x0, eps = self._x0_eps(model_output, t, sample)
        nxt = -1 if last else self._nominal[i + 1]
        a_next = (self.final_alpha_cumprod if last else self.alphas_cumprod[nxt]).to(sample.dtype)
        prev = a_next.sqrt() * x0 + (1 - a_next).sqrt() * eps
        if not last:
            self.timesteps[i + 1] = self.shifted(prev, nxt, t)  # relabels the sample's time only
        self._index = i + 1
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)
