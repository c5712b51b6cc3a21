"""DPM-Solver-v3 (Zheng et al. NeurIPS 2023, arXiv 2310.13268) as a diffusers scheduler.

In ``x̃ = x/α`` and ``λ = −log s`` (``s = σ/α``; λ is the half log-SNR) the probability-flow ODE is
``dx̃/dλ = D(x̃, λ) − x̃`` with the data prediction ``D = x̃ − s ε_θ``. DPM-Solver-v3 rewrites it with
three *empirical model statistics* (EMS) — a scalar ``l_λ``, a scalar ``s_λ`` and a bias ``b_λ`` of
the sample's shape — chosen on calibration data (the paper's eq. 9–11, in these variables):

    N(x̃, λ) = D − l_λ x̃,              l_λ = argmin E‖∂D/∂x̃ − l I‖²  = mean diagonal of ∂D/∂x̃,
    g(x̃, λ) = e^{−S(λ)} N − B(λ),      S = ∫ s_τ dτ, B = ∫ e^{−S} b_τ dτ,
    (s_λ, b_λ) = argmin E‖dN/dλ − s N − b‖²  (dN/dλ along the ODE trajectories),

so that ``x̃(λ_{i+1}) = e^{−∫(1 − l)} x̃(λ_i) + ∫ e^{−∫_τ(1 − l)} e^{S(τ)} (g(τ) + B(τ)) dτ`` exactly,
and g — the part of the model output the statistics do not explain — changes slowly in λ. The
solver approximates g by the polynomial through its last two values (the 2-step multistep
predictor; the paper's pseudo-order and corrector are not implemented) and integrates the known
factors by quadrature on the statistics' grid. With l = s = b = 0 it is DPM-Solver++(2M)
(Lu et al. 2022, arXiv 2211.01095) on uniform log-SNR steps.

``calibrate(model_fn, samples, num_inference_steps, grid=…)`` computes the EMS: it integrates the
calibration ``samples`` (VP noise at the top level) on a fine uniform λ grid, estimates ``l`` by
Hutchinson's trace estimator with central differences of D, and ``s, b`` by least squares against
the finite-difference dN/dλ. They are stored in the config (``statistics``), so ``save_pretrained``
caches them; they do not depend on the step count (the argument keeps the common signature).
The steps are uniform in λ from the top level to ``s(ᾱ_0)``; the output is at that last level.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from preftune.diffusion.schedulers.base import ModelFn, PreftuneScheduler

__all__ = ["DPMSolverV3Scheduler"]


def _cumtrapz(y: np.ndarray, x: np.ndarray) -> np.ndarray:
    """∫_{x_0}^{x_j} y along axis 0 (trapezoid rule), same shape as y."""
    dx = np.diff(x).reshape(-1, *[1] * (y.ndim - 1))
    steps = (y[1:] + y[:-1]) / 2 * dx
    return np.concatenate([np.zeros_like(y[:1]), np.cumsum(steps, axis=0)])


def _simpson(y: np.ndarray, x: np.ndarray) -> Any:
    """Simpson's rule over an odd number of equally spaced points (along axis 0)."""
    w = np.ones(len(x))
    w[1:-1:2], w[2:-1:2] = 4.0, 2.0
    w *= (x[1] - x[0]) / 3
    return np.tensordot(w, y, axes=(0, 0))


class DPMSolverV3Scheduler(PreftuneScheduler):
    """DPM-Solver-v3 (2-step multistep predictor) on uniform log-SNR steps; EMS from ``calibrate``."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        statistics: dict[str, list[Any]] | None = None,
        # accepted so that Stable Diffusion's scheduler config loads without warnings; unused (the
        # steps are uniform in λ and end at ᾱ_0)
        steps_offset: int = 0,
        clip_sample: bool = False,
        set_alpha_to_one: bool = False,
        timestep_spacing: str = "log-snr",
    ) -> None:
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")
        self.sigmas = torch.empty(0)
        self._coefs: list[dict[str, Any]] = []
        self._prev: tuple[float, torch.Tensor] | None = None

    # --- the statistics --------------------------------------------------------------------------
    def _ems(self) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """(λ grid, A = ∫(1 − l), S, B [G, …], l) — zeros (DPM-Solver++) when not calibrated."""
        stats = self.config.statistics
        lam_top, lam_low = -float(self.log_levels[-1]), -float(self.log_levels[0])
        if stats is None:
            grid = np.linspace(lam_top, lam_low, 2)
            zero = np.zeros(2)
            return grid, grid - lam_top, zero, np.zeros((2, 1)), zero
        grid = np.asarray(stats["lambdas"], dtype=np.float64)
        ls, ss = np.asarray(stats["l"], np.float64), np.asarray(stats["s"], np.float64)
        bs = np.asarray(stats["b"], np.float64).reshape(len(grid), -1)
        big_s = _cumtrapz(ss, grid)
        return grid, _cumtrapz(1 - ls, grid), big_s, _cumtrapz(np.exp(-big_s)[:, None] * bs, grid), ls

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Uniform λ steps from the top level to s(ᾱ_0); precomputes each step's coefficients."""
        n = num_inference_steps
        lam = np.linspace(-float(self.log_levels[-1]), -float(self.log_levels[0]), n + 1)
        levels = np.exp(-lam)
        self.num_inference_steps, self._index, self._prev = n, 0, None
        self.sigmas = torch.from_numpy(levels)
        self.continuous_timesteps = np.array([self._t_of(s) for s in levels[:-1]])
        self.timesteps = torch.from_numpy(self.continuous_timesteps.round().astype(np.int64)).to(device)
        grid, big_a, big_s, big_b, ls = self._ems()
        self._coefs = [self._step_coefs(lam[i], lam[i + 1], grid, big_a, big_s, big_b, ls) for i in range(n)]

    @staticmethod
    def _step_coefs(
        l0: float,
        l1: float,
        grid: np.ndarray,
        big_a: np.ndarray,
        big_s: np.ndarray,
        big_b: np.ndarray,
        ls: np.ndarray,
    ) -> dict[str, Any]:
        """Quadrature weights of one step λ_0 → λ_1 (Simpson on 201 points, statistics interpolated
        linearly between grid points)."""
        taus = np.linspace(l0, l1, 201)
        a_q, s_q = np.interp(taus, grid, big_a), np.interp(taus, grid, big_s)
        b_q = np.stack([np.interp(taus, grid, big_b[:, k]) for k in range(big_b.shape[1])], axis=1)
        w = np.exp(-(a_q[-1] - a_q) + s_q)
        return {
            "decay": math.exp(-(a_q[-1] - a_q[0])),
            "c0": float(_simpson(w, taus)),
            "c1": float(_simpson(w * (taus - l0), taus)),
            "cb": _simpson(w[:, None] * b_q, taus),
            "l": float(np.interp(l0, grid, ls)),
            "S": float(s_q[0]),
            "B": b_q[0],
            "lam": l0,
        }

    def calibrate(
        self,
        model_fn: ModelFn,
        samples: torch.Tensor,
        num_inference_steps: int | None = None,
        grid: int = 1000,
        delta: float = 1e-4,
        seed: int = 0,
    ) -> dict[str, float]:
        """Compute the EMS on `samples` (VP noise at the top level, [n, …]) with `model_fn(x, t) → ε`
        (fractional t); stores them in the config and returns the fine solve's size.

        The calibration trajectories are integrated with DPM-Solver++(2M) on `grid` uniform λ steps;
        ``l`` is Hutchinson's estimate (Rademacher probes, central differences of step `delta`)."""
        lam = np.linspace(-float(self.log_levels[-1]), -float(self.log_levels[0]), grid)
        gen = torch.Generator().manual_seed(seed)
        xt = samples.double() * math.sqrt(1 + math.exp(-2 * lam[0]))
        states, datas, ls = [], [], []
        prev: torch.Tensor | None = None
        for j in range(grid):
            s = math.exp(-lam[j])
            data = self._data(model_fn, xt, s)
            probe = torch.randint(0, 2, xt.shape, generator=gen).double() * 2 - 1
            jvp = (
                self._data(model_fn, xt + delta * probe, s) - self._data(model_fn, xt - delta * probe, s)
            ) / (2 * delta)
            ls.append(float((jvp * probe).mean()))
            states.append(xt.numpy().reshape(len(xt), -1))
            datas.append(data.numpy().reshape(len(xt), -1))
            if j + 1 < grid:
                h = lam[j + 1] - lam[j]
                d2 = data if prev is None else data + 0.5 * (data - prev)  # 2M, equal steps
                xt, prev = math.exp(-h) * xt + (1 - math.exp(-h)) * d2, data
        self._store(lam, np.stack(states), np.stack(datas), np.array(ls))
        return {"grid": float(grid), "samples": float(len(samples))}

    def _data(self, model_fn: ModelFn, xt: torch.Tensor, s: float) -> torch.Tensor:
        """D = x̃ − s ε(α x̃, t(s)) in float64."""
        alpha = 1.0 / math.sqrt(1 + s * s)
        eps = model_fn(alpha * xt, torch.tensor(self._t_of(s))).double()
        return xt - s * eps

    def _store(self, lam: np.ndarray, states: np.ndarray, datas: np.ndarray, ls: np.ndarray) -> None:
        """Least-squares s, b of dN/dλ ≈ s N + b (N = D − l x̃) per grid point, into the config."""
        big_n = datas - ls[:, None, None] * states
        d_n = np.gradient(big_n, lam, axis=0)
        nc, dc = big_n - big_n.mean(1, keepdims=True), d_n - d_n.mean(1, keepdims=True)
        ss = (nc * dc).sum((1, 2)) / np.maximum((nc * nc).sum((1, 2)), 1e-12)
        bs = d_n.mean(1) - ss[:, None] * big_n.mean(1)
        stats = {"lambdas": lam.tolist(), "l": ls.tolist(), "s": ss.tolist(), "b": bs.tolist()}
        self.keep(statistics=stats)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """One step x(λ_i) → x(λ_{i+1}) (VP samples) from ε_θ (or v_θ) at λ_i."""
        i = self._next_index()
        c, s = self._coefs[i], float(self.sigmas[i])
        alpha = 1.0 / math.sqrt(1 + s * s)
        eps = model_output
        if self.config.prediction_type == "v_prediction":
            eps = alpha * model_output + s * alpha * sample
        xt = sample / alpha
        bias = torch.as_tensor(c["B"], dtype=xt.dtype).reshape(-1) if c["B"].size > 1 else float(c["B"][0])
        g = math.exp(-c["S"]) * (xt - s * eps - c["l"] * xt) - self._shaped(bias, xt)
        out = c["decay"] * xt + c["c0"] * g + self._shaped(c["cb"], xt)
        if self._prev is not None:
            lam_prev, g_prev = self._prev
            out = out + c["c1"] * (g - g_prev) / (c["lam"] - lam_prev)
        self._prev, self._index = (c["lam"], g), i + 1
        s_next = float(self.sigmas[i + 1])
        prev = out / math.sqrt(1 + s_next * s_next)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    @staticmethod
    def _shaped(value: Any, like: torch.Tensor) -> Any:
        """A per-element statistic (flattened over one sample) broadcast over the batch."""
        if isinstance(value, float):
            return value
        arr = torch.as_tensor(np.asarray(value), dtype=like.dtype).reshape(-1)
        return arr.reshape(like.shape[1:]) if arr.numel() == like[0].numel() else float(arr[0])
