"""USF (Liu et al. ICLR 2024, arXiv 2312.07243): a per-step solver schedule, searched, as a scheduler.

USF writes one step of the probability-flow ODE in its exponential-integral form (the paper's §3; in
``x̃ = x/α``, ``λ = −log s``, ``s = σ/α``, data prediction ``D = x̃ − s ε_θ``):

    x̃(λ_{i+1}) = e^{−h_i} x̃(λ_i) + ∫_{λ_i}^{λ_{i+1}} e^{−(λ_{i+1} − τ)} D(x̃_τ, τ) dτ,   h_i = λ_{i+1} − λ_i,

and treats every step's way of approximating the integral as a free decision: the timestep, the
prediction type, the expansion order, the derivative estimate, and whether a (pseudo-)corrector
runs. S³ (the paper's §4) searches these decisions per step count. This class implements the
decision space with data prediction at every step and

- **timesteps**: any decreasing noise levels from the top level, ending at σ = 0 (the last step
  returns the data prediction at the last level, as DPM-Solver++ and UniPC with
  ``final_sigmas_type="zero"``; a last correction is therefore not used);
- **predictor order** ``p_i`` per step: D is replaced by the Lagrange polynomial through the last
  ``p_i`` data predictions and the integral is computed exactly for it (12-point Gauss–Legendre of a
  polynomial times ``e^{τ}``, exact to rounding) — the "derivative estimate" of USF is this
  polynomial, without the paper's relaxation coefficients;
- **corrector order** ``c_i`` per step (0 = none): after the model output at the predicted
  ``x̃_{i+1}`` is known, step ``i`` is redone with the polynomial through the last ``c_i`` data
  predictions *and* the new one (an exponential Adams–Moulton step, the pseudo-corrector of UniPC /
  USF: no extra model call, the next step reuses the output at the predicted point).

Not implemented: noise-prediction steps, relaxation coefficients, the analytical first step.
``calibrate(model_fn, samples, num_inference_steps)`` is the search. USF's S³ trains a performance
predictor to rank candidate schedules by FID; here each candidate is scored directly by its RMS
distance to a fine solution of the same ODE on the calibration samples (the exact test bed's
metric, cheap to evaluate): Nelder–Mead on the log-level decrements, then a coordinate pass over each
step's predictor and corrector order, then (if an order changed) Nelder–Mead again. The schedule is stored in the config
(``solver_schedules``, keyed by the step count), so ``save_pretrained`` caches it.

Without a searched schedule for the step count: uniform log-SNR levels from the top level to
``s(ᾱ_0)`` (then σ = 0), predictor order ``predictor_order`` (3) and corrector order
``corrector_order`` (2) at every step, lower while the history is short: a nominal order-3 method.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch
from diffusers.configuration_utils import register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerOutput

from preftune.diffusion.schedulers.base import ModelFn, PreftuneScheduler

__all__ = ["USFScheduler", "exponential_weights"]

_NODES, _GAUSS = np.polynomial.legendre.leggauss(12)


def exponential_weights(nodes: list[float], lam0: float, lam1: float) -> list[float]:
    """``∫_{λ0}^{λ1} e^{−(λ1 − τ)} L_j(τ) dτ`` for the Lagrange basis ``L_j`` on ``nodes``."""
    half = 0.5 * (lam1 - lam0)
    tau = half * _NODES + 0.5 * (lam1 + lam0)
    base = _GAUSS * half * np.exp(-(lam1 - tau))
    out = []
    for j, lj in enumerate(nodes):
        basis = np.ones_like(tau)
        for k, lk in enumerate(nodes):
            if k != j:
                basis = basis * (tau - lk) / (lj - lk)
        out.append(float((base * basis).sum()))
    return out


class USFScheduler(PreftuneScheduler):
    """Exponential-integrator predictor-corrector with a per-step schedule searched by ``calibrate``."""

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.00085,
        beta_end: float = 0.012,
        beta_schedule: str = "scaled_linear",
        trained_betas: list[float] | None = None,
        prediction_type: str = "epsilon",
        predictor_order: int = 3,
        corrector_order: int = 2,
        solver_schedules: dict[str, dict[str, list[Any]]] | None = None,
        # accepted so that Stable Diffusion's scheduler config loads without warnings; unused
        steps_offset: int = 0,
        clip_sample: bool = False,
        set_alpha_to_one: bool = False,
        timestep_spacing: str = "log-snr",
    ) -> None:
        if prediction_type not in ("epsilon", "v_prediction"):
            raise ValueError(f"prediction_type {prediction_type!r}: use epsilon or v_prediction")
        if not 1 <= predictor_order <= 4 or not 0 <= corrector_order <= 3:
            raise ValueError("predictor_order must be in 1..4 and corrector_order in 0..3")
        self._init_schedule(num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas)
        self.sigmas = torch.empty(0)
        self.predictor_orders: list[int] = []
        self.corrector_orders: list[int] = []
        self._history: list[tuple[float, torch.Tensor]] = []
        self._x_prev: torch.Tensor | None = None

    # --- schedule ------------------------------------------------------------------------------
    def default_levels(self, num_inference_steps: int) -> list[float]:
        """Uniform log-SNR levels from the top level to ``s(ᾱ_0)`` (σ = 0 not included)."""
        lo, hi = float(self.log_levels[0]), float(self.log_levels[-1])
        return [float(s) for s in np.exp(np.linspace(hi, lo, num_inference_steps))]

    def set_schedule(
        self,
        levels: list[float],
        predictor_orders: list[int],
        corrector_orders: list[int],
        device: str | torch.device | None = None,
    ) -> None:
        """Use these noise levels ``s`` (decreasing; σ = 0 is appended) and per-step orders."""
        n = len(levels)
        if len(predictor_orders) != n or len(corrector_orders) != n:
            raise ValueError(f"{n} levels need {n} predictor and {n} corrector orders")
        self.num_inference_steps, self._index = n, 0
        self._history, self._x_prev = [], None
        self.sigmas = torch.tensor([*levels, 0.0], dtype=torch.float64)
        self.continuous_timesteps = np.array([self._t_of(s) for s in levels])
        self.timesteps = torch.from_numpy(self.continuous_timesteps.round().astype(np.int64)).to(device)
        self.predictor_orders = [int(p) for p in predictor_orders]
        self.corrector_orders = [int(c) for c in corrector_orders]

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """The searched schedule for this step count if ``calibrate`` made one, else the default."""
        n = num_inference_steps
        found = (self.config.solver_schedules or {}).get(str(n))
        if found is not None:
            self.set_schedule(found["sigmas"], found["predictor_orders"], found["corrector_orders"], device)
            return
        p, c = int(self.config.predictor_order), int(self.config.corrector_order)
        self.set_schedule(self.default_levels(n), [p] * n, [c] * n, device)

    # --- one step ------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
        **kwargs: Any,
    ) -> SchedulerOutput | tuple[torch.Tensor]:
        """Correct the current sample (if the previous step asks), then predict the next one."""
        prev = self._advance(model_output, sample)
        return SchedulerOutput(prev_sample=prev) if return_dict else (prev,)

    def _advance(self, model_output: torch.Tensor, sample: torch.Tensor) -> torch.Tensor:
        i = self._next_index()
        s = float(self.sigmas[i])
        alpha = 1.0 / math.sqrt(1 + s * s)
        eps = model_output
        if self.config.prediction_type == "v_prediction":
            eps = alpha * model_output + s * alpha * sample
        xt, lam = sample / alpha, -math.log(s)
        data = xt - s * eps
        if i > 0 and self.corrector_orders[i - 1] > 0 and self._x_prev is not None:
            past = self._history[-self.corrector_orders[i - 1] :]
            xt = self._integrate(self._x_prev, self._history[-1][0], lam, [*past, (lam, data)])
        self._history = [*self._history[-3:], (lam, data)]
        s_next = float(self.sigmas[i + 1])
        if s_next == 0:
            out = data
        else:
            k = min(self.predictor_orders[i], len(self._history))
            out = self._integrate(xt, lam, -math.log(s_next), self._history[-k:])
        self._x_prev, self._index = xt, i + 1
        return out / math.sqrt(1 + s_next * s_next)

    @staticmethod
    def _integrate(
        xt: torch.Tensor, lam0: float, lam1: float, points: list[tuple[float, torch.Tensor]]
    ) -> torch.Tensor:
        """``e^{−h} x̃ + ∫ e^{−(λ1 − τ)} P(τ) dτ`` with P the polynomial through ``points``."""
        weights = exponential_weights([p[0] for p in points], lam0, lam1)
        out = math.exp(-(lam1 - lam0)) * xt
        for w, (_, d) in zip(weights, points):
            out = out + w * d
        return out

    # --- the search ----------------------------------------------------------------------------
    def _solve(
        self, model_fn: ModelFn, noise: torch.Tensor, levels: list[float], p: list[int], c: list[int]
    ) -> torch.Tensor:
        self.set_schedule(levels, p, c)
        x = noise
        for tc in self.continuous_timesteps:
            x = self._advance(model_fn(x, torch.tensor(float(tc))).to(x.dtype), x)
        return x

    def _levels_of(self, z: np.ndarray) -> list[float]:
        """Levels from the top: log-level gaps ``span · softmax(z)``; the last weight is the unused
        rest above ``s(ᾱ_0)``, so the levels stay decreasing and inside the trained range."""
        hi, lo = float(self.log_levels[-1]), float(self.log_levels[0])
        w = np.exp(z - z.max())
        gaps = (hi - lo) * w / w.sum()
        return [math.exp(hi), *np.exp(hi - np.cumsum(gaps[:-1]))]

    def calibrate(
        self,
        model_fn: ModelFn,
        samples: torch.Tensor,
        num_inference_steps: int,
        reference_steps: int = 400,
        max_evals: int = 1500,
        search_orders: bool = True,
    ) -> dict[str, float]:
        """Search the schedule for ``num_inference_steps`` on ``samples`` (VP noise at the top level)
        with ``model_fn(x, t) → ε`` (fractional t); returns the RMS distance to the reference before
        (the default schedule) and after, and stores the schedule in the config.

        The reference is this solver with the default orders on ``reference_steps`` uniform log-SNR
        levels. ``max_evals`` bounds the first Nelder–Mead run (the second gets half)."""
        from scipy.optimize import minimize

        n, x = num_inference_steps, samples.double()
        p0, c0 = int(self.config.predictor_order), int(self.config.corrector_order)
        r = reference_steps
        reference = self._solve(model_fn, x, self.default_levels(r), [p0] * r, [c0] * r)

        def rms(levels: list[float], p: list[int], c: list[int]) -> float:
            value = float(((self._solve(model_fn, x, levels, p, c) - reference) ** 2).mean().sqrt())
            return value if math.isfinite(value) else 1e9

        levels, p, c = self.default_levels(n), [p0] * n, [c0] * n
        before = best = rms(levels, p, c)
        z = np.array([0.0] * (n - 1) + [-8.0])

        def search(z: np.ndarray, evals: int) -> np.ndarray:
            nonlocal levels, best
            found = minimize(
                lambda v: rms(self._levels_of(v), p, c),
                z,
                method="Nelder-Mead",
                options={"maxfev": evals, "xatol": 1e-4, "fatol": 1e-9},
            )
            if found.fun < best:
                levels, best = self._levels_of(found.x), float(found.fun)
            return np.asarray(found.x)

        if n > 1:
            z = search(z, max_evals)
        if search_orders and n > 1:
            start = (list(p), list(c))
            for i in range(n - 1):
                for which, options in ((p, range(1, 5)), (c, range(0, 4))):
                    keep = which[i]
                    for o in options:
                        which[i] = o
                        value = rms(levels, p, c)
                        if value < best - 1e-12:
                            best, keep = value, o
                    which[i] = keep
            if (p, c) != start:
                search(z, max_evals // 2)
        table = dict(self.config.solver_schedules or {})
        table[str(n)] = {"sigmas": [float(s) for s in levels], "predictor_orders": p, "corrector_orders": c}
        self.keep(solver_schedules=table)
        self.set_timesteps(n)
        return {"before": before, "after": best}
