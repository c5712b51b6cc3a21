"""x_t by DDIM inversion (InPO) or ReNoise inversion (SmPO) instead of forward noise.

InPO (Lu et al. CVPR 2025, arXiv:2503.18454, §4.2 "reparametrized DDIM", Eq. 13-15): the clean
latent x_0 is inverted by the *current* model with the deterministic DDIM inverse step through the
inverse grid τ_1 < τ_2 < … of `steps` points (`DDIMInverseScheduler`), keeping the points below the
sampled t; after each step η_inv · σ · z is added (z ~ N(0, I)), σ² = β̃ the DDPM one-step posterior
variance at the grid point reached, τ + T/steps (what the script's `_get_variance(prev_t, t)`
computes: diffusers' second argument there is the unused predicted variance). The noise the model must predict is then
ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t), at the sampled t — as the official training script does, which
also evaluates ᾱ at t although the last inverted grid point lies below t. Defaults of that script:
10 inverse steps, η_inv = 0.1. Differences, by design: each pair draws its own t (the script uses
the first pair's t for its whole per-device batch, which is one pair there), and the DDPM variance
index is clamped at T − 1 at the top of the grid (where the script would index past the schedule).

SmPO (Lu et al. ICML 2025, arXiv:2506.02698, §4.3) replaces each inverse step by a ReNoise step
(Garibi et al. 2024): predict ε at x, take the inverse step, predict ε again at the result, and
take the step from x with the mean of the two predictions.

Both papers (and the official InPO script, which asserts it) use ε-prediction models. A v- or
x_0-prediction model is inverted the same way by converting each prediction to the ε it implies at
the timestep the model was evaluated at, with the formulas of diffusers' `DDIMScheduler.step`
(`epsilon_of`); the loss target is then returned in the model's own parametrisation (v = √ᾱ_t ε −
√(1 − ᾱ_t) x_0, `scheduler.get_velocity`; or x_0), so the statistic −½·mse is the one the seam
uses for that model. An ε-prediction model takes exactly the code path it took before.
"""

from __future__ import annotations

from typing import Any

import torch

from preftune.errors import ConfigError

INVERTIBLE = ("epsilon", "v_prediction", "sample")


def prediction_kind(scheduler: Any) -> str:
    """The scheduler's `prediction_type` (default "epsilon"), refused unless one of INVERTIBLE."""
    kind = str(scheduler.config.get("prediction_type", "epsilon"))
    if kind not in INVERTIBLE:
        raise ConfigError(
            f"inversion (inpo, smpo): prediction_type '{kind}' cannot be inverted with DDIM; "
            f"use a pipeline whose scheduler predicts one of {', '.join(INVERTIBLE)}"
        )
    return kind


def inverse_scheduler(scheduler: Any, steps: int) -> Any:
    """A `DDIMInverseScheduler` on the training scheduler's schedule, set to `steps` inverse steps;
    it steps with ε (predictions of other kinds are converted first, `epsilon_of`)."""
    from diffusers import DDIMInverseScheduler

    if prediction_kind(scheduler) == "epsilon":
        inverse = DDIMInverseScheduler.from_config(scheduler.config)
    else:
        inverse = DDIMInverseScheduler.from_config(scheduler.config, prediction_type="epsilon")
    inverse.set_timesteps(steps)
    return inverse


def epsilon_of(pred: torch.Tensor, x: torch.Tensor, alpha: torch.Tensor | float, kind: str) -> torch.Tensor:
    """The ε a prediction of `kind` at x implies, ᾱ = ᾱ_t of the timestep the model saw — the
    conversions of diffusers' `DDIMScheduler.step`: v → ε = √ᾱ·v + √(1 − ᾱ)·x (Salimans & Ho 2022,
    §4, v = √ᾱ ε − √(1 − ᾱ) x_0); x_0 → ε = (x − √ᾱ·x_0) / √(1 − ᾱ); ε unchanged."""
    if kind == "epsilon":
        return pred
    if kind == "v_prediction":
        return alpha**0.5 * pred + (1 - alpha) ** 0.5 * x
    return (x - alpha**0.5 * pred) / (1 - alpha) ** 0.5


def posterior_std(scheduler: Any, t: int) -> float:
    """√β̃_t, the DDPM one-step posterior variance at timestep t (clamped to T − 1):
    β̃_t = (1 − ᾱ_{t−1}) / (1 − ᾱ_t) · (1 − ᾱ_t / ᾱ_{t−1}) (Ho et al. 2020, Eq. 7)."""
    t = min(t, int(scheduler.config.num_train_timesteps) - 1)
    a_t = float(scheduler.alphas_cumprod[t])
    a_prev = float(scheduler.alphas_cumprod[t - 1]) if t >= 1 else 1.0
    return max((1.0 - a_prev) / (1.0 - a_t) * (1.0 - a_t / a_prev), 1e-20) ** 0.5


@torch.no_grad()
def invert(
    model: Any,
    latents: torch.Tensor,
    cond: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    *,
    steps: int = 10,
    eta: float = 0.1,
    renoise: bool = False,
    noise: list[torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of N clean latents [N, C, h, w] inverted by `model` up to their timesteps [N].

    The target is ε = (x_t − √ᾱ_t x_0) / √(1 − ᾱ_t) in the model's parametrisation: ε itself, the
    matching v = √ᾱ_t ε − √(1 − ᾱ_t) x_0 for v-prediction, x_0 for sample prediction.

    noise[j]: the z added after inverse grid point j ([N, C, h, w], default fresh randn). Rows whose
    t is at or below a grid point stop there (their x_t is the last point below t, or x_0).
    """
    kind = prediction_kind(scheduler)
    inverse = inverse_scheduler(scheduler, steps)
    ratio = int(scheduler.config.num_train_timesteps) // steps
    x = latents.clone()
    for j, tau in enumerate(int(v) for v in inverse.timesteps):
        active = timesteps > tau
        if not bool(active.any()):
            break
        rows = active.nonzero().flatten()
        t_rows = torch.full((len(rows),), tau, device=latents.device, dtype=torch.long)

        start, c_rows, a_tau = x[rows], cond[rows], scheduler.alphas_cumprod[tau].float()
        pred = epsilon_of(
            model(start, t_rows, encoder_hidden_states=c_rows).sample.float(), start, a_tau, kind
        )
        if renoise:
            ahead = inverse.step(pred, tau, start).prev_sample
            again = model(ahead, t_rows, encoder_hidden_states=c_rows).sample.float()
            pred = 0.5 * (pred + epsilon_of(again, ahead, a_tau, kind))
        moved = inverse.step(pred, tau, start).prev_sample
        z = noise[j][rows] if noise is not None else torch.randn_like(moved)
        x[rows] = moved + eta * z * posterior_std(scheduler, tau + ratio)
    alpha = (
        scheduler.alphas_cumprod.to(latents.device)[timesteps].float().view(-1, *[1] * (latents.dim() - 1))
    )
    target = (x - alpha.sqrt() * latents) / (1.0 - alpha).sqrt()
    if kind == "v_prediction":
        return x, scheduler.get_velocity(latents, target, timesteps)
    if kind == "sample":
        return x, latents.clone()
    return x, target
