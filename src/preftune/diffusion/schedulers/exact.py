"""Run any `diffusers` scheduler on the exact Gaussian-mixture ODE and measure its error and order.

The model is the exact ε* of :class:`preftune.diffusion.gmm.GaussianMixture`, evaluated at the noise
level the scheduler itself uses for that step (its ``sigmas[step_index]`` when it keeps k-diffusion
sigmas, else ``alphas_cumprod[t]``), so the measured error is the solver's discretisation error only.
Every scheduler starts on the same reference trajectory at its own first noise level and is compared
with the exact flow at its own last one, in ``x̃ = x/α`` units (RMS over samples and dimensions).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch

from preftune.diffusion.gmm import GaussianMixture, level_of

# Stable Diffusion v1's scheduler config, as `pipe.scheduler.config` holds it.
SD_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "clip_sample": False,
    "set_alpha_to_one": False,
    "steps_offset": 1,
    "timestep_spacing": "leading",
}


def _sigmas(scheduler: Any) -> np.ndarray | None:
    """The scheduler's k-diffusion levels ``s = σ/α`` per step, or None if it keeps none."""
    sig = getattr(scheduler, "sigmas", None)
    return None if sig is None else np.asarray(torch.as_tensor(sig, dtype=torch.float64))


def _is_ve(scheduler: Any) -> bool:
    """True for schedulers whose sample is ``x̃`` (Euler/Karras style), False for VP ``x``."""
    return float(getattr(scheduler, "init_noise_sigma", 1.0)) > 1.0


def _level(scheduler: Any, t: Any, step: int) -> float:
    """The noise level ``s`` at which the scheduler evaluates the model at its ``step``-th call."""
    sig = _sigmas(scheduler)
    if sig is not None:
        return float(sig[step])
    return level_of(float(scheduler.alphas_cumprod[int(t)]))


def final_level(scheduler: Any) -> float:
    """The noise level of the scheduler's output after its last step."""
    sig = _sigmas(scheduler)
    if sig is not None:
        return float(sig[-1])
    return level_of(float(scheduler.final_alpha_cumprod))


def sample_with(
    scheduler: Any, gmm: GaussianMixture, xt: np.ndarray, s_start: float
) -> tuple[np.ndarray, float]:
    """Run ``scheduler`` (after ``set_timesteps``) from ``x̃ = xt`` at level ``s_start``.

    Returns the final ``x̃`` and its level. ``xt`` must lie at the scheduler's first level.
    """
    first = _level(scheduler, scheduler.timesteps[0], 0)
    if not math.isclose(first, s_start, rel_tol=1e-9):
        raise ValueError(f"start level {s_start} is not the scheduler's first level {first}")
    ve = _is_ve(scheduler)
    scale = 1.0 if ve else 1.0 / math.sqrt(1 + s_start**2)
    x = torch.as_tensor(xt * scale, dtype=torch.float64)
    for i, t in enumerate(scheduler.timesteps):
        s = _level(scheduler, t, i)
        xin = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        alpha = 1.0 / math.sqrt(1 + s * s)
        eps = gmm.eps_tilde(np.asarray(xin, dtype=np.float64) / alpha, s)
        x = scheduler.step(torch.as_tensor(eps), t, x).prev_sample
    s_end = final_level(scheduler)
    out = np.asarray(x, dtype=np.float64)
    return (out if ve else out * math.sqrt(1 + s_end**2)), s_end


def trajectory_errors(
    make: Callable[[], Any], gmm: GaussianMixture, x_top: np.ndarray, s_top: float, nfe: int
) -> np.ndarray:
    """Per-trajectory RMS error in ``x̃`` of scheduler ``make()`` with ``nfe`` steps vs the exact flow.

    ``x_top`` are samples at the schedule's top level ``s_top``; they are carried exactly to the
    scheduler's first level (which may be lower, e.g. with ``leading`` spacing) before it starts.
    """
    scheduler = make()
    scheduler.set_timesteps(nfe)
    s0 = _level(scheduler, scheduler.timesteps[0], 0)
    start = gmm.flow(x_top, s_top, s0)
    out, s_end = sample_with(scheduler, gmm, start, s0)
    exact = gmm.flow(start, s0, s_end)
    return np.sqrt(np.mean((out - exact) ** 2, axis=1))


def solver_error(
    make: Callable[[], Any], gmm: GaussianMixture, x_top: np.ndarray, s_top: float, nfe: int
) -> float:
    """RMS over trajectories and dimensions of :func:`trajectory_errors`."""
    return float(np.sqrt(np.mean(trajectory_errors(make, gmm, x_top, s_top, nfe) ** 2)))


def order(nfes: Sequence[int], errors: Sequence[float]) -> float:
    """Measured convergence order: minus the least-squares slope of log error against log NFE."""
    slope = np.polyfit(np.log(np.asarray(nfes, float)), np.log(np.asarray(errors, float)), 1)[0]
    return float(-slope)


def gmm_model_fn(
    gmm: GaussianMixture, alphas_cumprod: Any
) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """``model_fn(x, t) → ε*`` for VP samples ``x`` at a possibly fractional timestep ``t``.

    The level at a fractional ``t`` interpolates ``log s`` linearly between the integer timesteps,
    the inverse of diffusers' ``_sigma_to_t``.
    """
    ac = np.asarray(torch.as_tensor(alphas_cumprod, dtype=torch.float64))
    log_s = np.log(np.sqrt((1 - ac) / ac))

    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        s = float(np.exp(np.interp(float(t), np.arange(len(log_s)), log_s)))
        alpha = 1.0 / math.sqrt(1 + s * s)
        return torch.from_numpy(gmm.eps_tilde(np.asarray(x, dtype=np.float64) / alpha, s))

    return model_fn


def diffusers_configurations() -> dict[str, Callable[[], Any]]:
    """diffusers' own solvers on SD's config: class defaults, and log-SNR / Karras spacing."""
    import diffusers as d

    def make(cls: Any, **extra: Any) -> Callable[[], Any]:
        return lambda: cls.from_config({**SD_CONFIG, **extra})

    dpm, unipc = d.DPMSolverMultistepScheduler, d.UniPCMultistepScheduler
    return {
        "DDIM (SD: leading)": make(d.DDIMScheduler),
        "DDIM trailing": make(d.DDIMScheduler, timestep_spacing="trailing"),
        "Euler (SD: leading)": make(d.EulerDiscreteScheduler),
        "Euler Karras": make(d.EulerDiscreteScheduler, use_karras_sigmas=True),
        "DPM++2M (SD: leading)": make(dpm),
        "DPM++2M linspace": make(dpm, timestep_spacing="linspace"),
        "DPM++2M log-SNR": make(dpm, use_lu_lambdas=True),
        "DPM++2M Karras": make(dpm, use_karras_sigmas=True),
        "DPM++3M log-SNR": make(dpm, solver_order=3, use_lu_lambdas=True),
        "UniPC bh2 (SD: leading)": make(unipc),
        "UniPC bh2 Karras": make(unipc, use_karras_sigmas=True),
        "DEIS 3 (SD: leading)": make(d.DEISMultistepScheduler),
        "DEIS 3 Karras": make(d.DEISMultistepScheduler, use_karras_sigmas=True),
    }


def measure(
    configurations: dict[str, Callable[[], Any]],
    gmm: GaussianMixture,
    nfes: Sequence[int] = (5, 10, 20, 40),
    samples: int = 64,
    seed: int = 0,
    order_nfes: Sequence[int] = (10, 20, 40),
) -> list[dict[str, Any]]:
    """One row per configuration: RMS error per NFE and the order measured over ``order_nfes``."""
    from preftune.diffusion.gmm import sd_alphas_cumprod

    s_top = level_of(float(sd_alphas_cumprod()[-1]))
    x_top = gmm.sample(samples, np.random.default_rng(seed), s=s_top)
    rows = []
    for name, make in configurations.items():
        per = {n: trajectory_errors(make, gmm, x_top, s_top, n) for n in sorted({*nfes, *order_nfes, 10})}
        errors = {n: float(np.sqrt(np.mean(e**2))) for n, e in per.items()}
        median = float(np.median(per[10]))  # the typical trajectory, robust to a few outliers
        fit = [n for n in order_nfes if np.isfinite(errors[n])]
        rows.append(
            {
                "solver": name,
                "errors": {str(n): errors[n] for n in nfes},
                "median_error_10": median,
                "order": order(fit, [errors[n] for n in fit]) if len(fit) > 1 else float("nan"),
            }
        )
    return rows
