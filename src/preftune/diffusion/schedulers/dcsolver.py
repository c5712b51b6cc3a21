"""DC-Solver (Zhao et al. ECCV 2024, arXiv 2409.03755): UniPC with dynamic compensation.

In a predictor-corrector sampler (UniPC, Zhao et al. 2023, arXiv 2302.04867) the model output kept for
the next predictor step was evaluated at the *predicted* sample, while the sample itself was then
moved by the corrector: the two are misaligned. DC-Solver replaces, before each predictor step, the
latest model output by the Lagrange interpolation (degree `dc_order`, default 2) of the last
`dc_order + 1` outputs evaluated at a shifted time

    τ_i = ρ_i t_i + (1 − ρ_i) t_{i−1},                  (ρ_i = 1: plain UniPC)

with one compensation ratio ρ_i per step, searched on a few trajectories so that each step lands on
a fine reference solution (the paper's search stage; its cascade polynomial regression, which
predicts ratios for unseen step counts and guidance scales, is not implemented). Choices made
here: times are the half log-SNR λ = −log(σ/α) of the stored outputs (the official code uses its
continuous t); each ratio is chosen greedily, step by step, by bounded scalar minimisation of the
distance between the *predicted* next sample and the reference at that level (the official search
runs 40 AdamW steps on the corrected sample).

This class is diffusers' `UniPCMultistepScheduler` (bh2, order 3, Karras σ by default) with the
ratios in the config (`dc_ratios`, keyed by the step count): `calibrate(model_fn, samples,
num_inference_steps)` searches and stores them, so `save_pretrained` caches them.
"""

from __future__ import annotations

import copy
import math
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_unipc_multistep import UniPCMultistepScheduler

from preftune.diffusion.schedulers.base import CalibratedMixin, ModelFn

__all__ = ["DCSolverScheduler"]

_Base: Any = UniPCMultistepScheduler


def lagrange(values: list[torch.Tensor], times: list[float], at: float) -> torch.Tensor:
    """The interpolating polynomial through (times[j], values[j]) evaluated at `at`."""
    out = torch.zeros_like(values[0])
    for i, (vi, ti) in enumerate(zip(values, times)):
        weight = 1.0
        for j, tj in enumerate(times):
            if i != j:
                weight *= (at - tj) / (ti - tj)
        out = out + weight * vi
    return out


class DCSolverScheduler(CalibratedMixin, _Base):
    """UniPC-bh2 with DC-Solver's per-step compensation ratios (plain UniPC without calibration)."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        solver_order: int = 3,
        prediction_type: str = "epsilon",
        use_karras_sigmas: bool = True,
        dc_ratios: dict[str, list[float]] | None = None,
        dc_order: int = 2,
        steps_offset: int = 0,
        timestep_spacing: str = "linspace",
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            solver_order=solver_order,
            prediction_type=prediction_type,
            use_karras_sigmas=use_karras_sigmas,
            steps_offset=steps_offset,
            timestep_spacing=timestep_spacing,
        )
        self.register_to_config(dc_ratios=dc_ratios, dc_order=dc_order)
        self._ratios: list[float] = []

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any
    ) -> None:
        super().set_timesteps(num_inference_steps, device=device, **kwargs)
        self._ratios = list((self.config.dc_ratios or {}).get(str(num_inference_steps), []))

    def _lambda(self, index: int) -> float:
        s = float(self.sigmas[index])
        return -math.log(s) if s > 0 else math.inf

    def compensated(self, ratio: float) -> torch.Tensor | None:
        """The latest output replaced by the interpolation at τ (None while the history is short)."""
        k = int(self.config.dc_order)
        i = self.step_index
        if ratio == 1.0 or self.lower_order_nums < k or i < k:
            return None
        outs = list(self.model_outputs[-(k + 1) :])
        times = [self._lambda(i - j) for j in range(k, -1, -1)]
        return lagrange(outs, times, ratio * times[-1] + (1 - ratio) * times[-2])

    def multistep_uni_p_bh_update(
        self, model_output: torch.Tensor, *args: Any, **kwargs: Any
    ) -> torch.Tensor:
        i = self.step_index
        ratio = self._ratios[i] if i < len(self._ratios) else 1.0
        new = self.compensated(ratio)
        if new is not None:
            self.model_outputs[-1] = new
        return super().multistep_uni_p_bh_update(model_output, *args, **kwargs)

    # --- the search ---------------------------------------------------------------------------------
    def calibrate(
        self, model_fn: ModelFn, samples: torch.Tensor, num_inference_steps: int, substeps: int = 50
    ) -> dict[str, float]:
        """Search one ratio per step for `num_inference_steps` on `samples` (VP noise at the top
        level) with `model_fn(x, t) → ε` (fractional t); returns the RMS final error against the
        reference before and after, and stores the ratios in the config."""
        from scipy.optimize import minimize_scalar

        n = num_inference_steps
        self.set_timesteps(n)
        refs = self._references(model_fn, samples.double(), substeps)
        before = self._final_error(model_fn, samples.double(), [1.0] * n, refs[-1])
        ratios: list[float] = []
        self.set_timesteps(n)
        self._ratios = [1.0] * n
        x = samples.double()
        for i, t in enumerate(self.timesteps):
            eps = self._eps(model_fn, x, i)

            def distance(r: float, eps: torch.Tensor = eps, x: torch.Tensor = x, i: int = i) -> float:
                trial = copy.deepcopy(self)
                trial._ratios = [*ratios, r] + [1.0] * (n - i - 1)
                out = trial.step(eps, trial.timesteps[i], x).prev_sample
                return float(((out - refs[i + 1]) ** 2).mean())

            ratio = 1.0
            if float(self.sigmas[i + 1]) > 0:  # the last step to σ = 0 keeps ratio 1
                found = minimize_scalar(
                    distance, bounds=(0.0, 2.0), method="bounded", options={"xatol": 1e-3}
                )
                ratio = float(found.x) if found.fun < distance(1.0) else 1.0
            ratios.append(ratio)
            self._ratios = ratios + [1.0] * (n - i - 1)
            x = self.step(eps, t, x).prev_sample
        table = dict(self.config.dc_ratios or {})
        table[str(n)] = ratios
        self.keep(dc_ratios=table)
        after = self._final_error(model_fn, samples.double(), ratios, refs[-1])
        return {"before": before, "after": after}

    def _eps(self, model_fn: ModelFn, x: torch.Tensor, i: int) -> torch.Tensor:
        sigma = np.array(float(self.sigmas[i]))
        return model_fn(x, torch.tensor(float(self._sigma_to_t(sigma, self._log_levels())))).to(x.dtype)

    def _final_error(
        self, model_fn: ModelFn, x: torch.Tensor, ratios: list[float], ref: torch.Tensor
    ) -> float:
        self.set_timesteps(len(ratios))
        self._ratios = list(ratios)
        for i, t in enumerate(self.timesteps):
            x = self.step(self._eps(model_fn, x, i), t, x).prev_sample
        return float(((x - ref) ** 2).mean().sqrt())

    def _references(self, model_fn: ModelFn, x: torch.Tensor, substeps: int) -> list[torch.Tensor]:
        """The VP states at every level of the schedule, by DPM-Solver++(2M) with `substeps` uniform
        log-SNR steps per interval; σ = 0 is reached from the schedule's lowest level by the data
        prediction there (as the solvers' own last step)."""
        levels = [float(s) for s in self.sigmas]
        log_sigmas = self._log_levels()
        lowest = math.exp(float(log_sigmas[0]))
        xt, prev, out = x * math.sqrt(1 + levels[0] ** 2), None, [x]
        for a, b in zip(levels[:-1], levels[1:]):
            grid = np.exp(np.linspace(math.log(a), math.log(max(b, lowest)), substeps + 1))
            for s, s_next in zip(grid[:-1], grid[1:]):
                alpha = 1.0 / math.sqrt(1 + s * s)
                t = torch.tensor(float(self._sigma_to_t(np.array(s), log_sigmas)))
                data = xt - s * model_fn(alpha * xt, t).double()
                h = math.log(s / s_next)
                d2 = data if prev is None else data + 0.5 * (data - prev)
                xt, prev = math.exp(-h) * xt + (1 - math.exp(-h)) * d2, data
            if b == 0:
                alpha = 1.0 / math.sqrt(1 + lowest * lowest)
                t = torch.tensor(float(self._sigma_to_t(np.array(lowest), log_sigmas)))
                xt = xt - lowest * model_fn(alpha * xt, t).double()
            out.append(xt / math.sqrt(1 + b * b))
        return out
