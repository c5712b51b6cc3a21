"""DPM-Solver++(2M) on searched noise levels: the time-step search of USF / S³ (Liu et al. 2023).

Liu et al. (arXiv 2312.07243, "A Unified Sampling Framework for Solver Searching of Diffusion
Probabilistic Models") write a sampler as per-step choices — the timestep, the prediction type, the
order, the derivative estimate and whether to correct — and search them against a metric. This class
searches **only the timesteps**, for DPM-Solver++(2M) (Lu et al. 2022, arXiv 2211.01095, Algorithm 2):
the other USF choices stay those of diffusers' ``DPMSolverMultistepScheduler``. The search objective
is the distance to a fine-step reference solution of the same ODE on calibration samples (USF scores
candidates by sample quality; on the exact test bed the solution error is the natural score).

``calibrate(model_fn, samples, num_inference_steps)`` runs the search: the first level is the
schedule's top noise level, the others are parameterised by positive decrements of ``log s``
(``s = σ/α``), started from uniform log-SNR steps (``use_lu_lambdas``) and improved with Nelder–Mead.
The levels are stored in the config (``searched_sigmas``, keyed by the step count), so
``save_pretrained`` caches them; ``set_timesteps(n)`` uses them when present, else uniform log-SNR.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_dpmsolver_multistep import DPMSolverMultistepScheduler

from preftune.diffusion.schedulers.base import CalibratedMixin, ModelFn

__all__ = ["SearchedStepsDPMSolverScheduler"]

_Base: Any = DPMSolverMultistepScheduler  # diffusers' scheduler classes are typed loosely


class SearchedStepsDPMSolverScheduler(CalibratedMixin, _Base):
    """DPM-Solver++(2M), uniform log-SNR steps unless ``calibrate`` searched levels for this count."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        solver_order: int = 2,
        prediction_type: str = "epsilon",
        searched_sigmas: dict[str, list[float]] | None = None,
    ) -> None:
        super().__init__(
            num_train_timesteps=num_train_timesteps,
            beta_start=beta_start,
            beta_end=beta_end,
            beta_schedule=beta_schedule,
            trained_betas=trained_betas,
            solver_order=solver_order,
            prediction_type=prediction_type,
            use_lu_lambdas=True,
        )
        self.register_to_config(searched_sigmas=searched_sigmas)
        self.continuous_timesteps: np.ndarray | None = None

    def set_levels(self, levels: list[float], device: str | torch.device | None = None) -> None:
        """Use the noise levels ``s`` (decreasing; σ = 0 is appended) for the next sampling run."""
        super().set_timesteps(len(levels), device=device)
        log_sigmas = self._log_levels()
        t = np.array([self._sigma_to_t(np.array(s), log_sigmas) for s in levels], dtype=np.float64)
        self.continuous_timesteps = t
        self.timesteps = torch.from_numpy(t.round().astype(np.int64)).to(device)
        self.sigmas = torch.from_numpy(np.array([*levels, 0.0], dtype=np.float32))

    def set_timesteps(
        self, num_inference_steps: int | None = None, device: Any = None, **kwargs: Any
    ) -> None:
        found = (self.config.searched_sigmas or {}).get(str(num_inference_steps))
        if found is None or kwargs:
            super().set_timesteps(num_inference_steps, device=device, **kwargs)
            sig = self.sigmas[:-1].double().numpy()
            self.continuous_timesteps = np.array([self._sigma_to_t(s, self._log_levels()) for s in sig])
            return
        self.set_levels(list(found), device=device)

    def _solve(self, model_fn: ModelFn, x: torch.Tensor, levels: list[float]) -> torch.Tensor:
        self.set_levels(levels)
        assert self.continuous_timesteps is not None
        for t, tc in zip(self.timesteps, self.continuous_timesteps):
            x = self.step(model_fn(x, torch.tensor(float(tc))), t, x).prev_sample
        return x

    def calibrate(
        self,
        model_fn: ModelFn,
        samples: torch.Tensor,
        num_inference_steps: int,
        reference_steps: int = 500,
        max_evals: int = 800,
    ) -> dict[str, float]:
        """Search the levels for ``num_inference_steps`` on ``samples`` (noise at the top level).

        ``model_fn(x, t) → ε`` takes a fractional timestep ``t``. Returns the RMS distance to the
        reference before (uniform log-SNR) and after the search; the levels go into the config.
        """
        from scipy.optimize import minimize

        n = num_inference_steps
        top = math.exp(float(self._log_levels()[-1]))
        low = math.exp(float(self._log_levels()[0]))
        grid = list(np.exp(np.linspace(math.log(top), math.log(low), reference_steps)))
        reference = self._solve(model_fn, samples.double(), grid)

        def levels(z: np.ndarray) -> list[float]:
            return [top, *np.exp(math.log(top) - np.cumsum(np.exp(z)))]

        def rms(z: np.ndarray) -> float:
            out = self._solve(model_fn, samples.double(), levels(z))
            value = float(((out - reference) ** 2).mean().sqrt())
            return value if math.isfinite(value) else 1e9

        z0 = np.full(n - 1, math.log((math.log(top) - math.log(low)) / (n - 1)))
        before = rms(z0)
        best = minimize(
            rms, z0, method="Nelder-Mead", options={"maxfev": max_evals, "xatol": 1e-4, "fatol": 1e-9}
        )
        z = best.x if best.fun < before else z0
        table = dict(self.config.searched_sigmas or {})
        table[str(n)] = [float(s) for s in levels(z)]
        self.keep(searched_sigmas=table)
        return {"before": before, "after": min(before, float(best.fun))}
