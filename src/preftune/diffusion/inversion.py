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
"""

from __future__ import annotations

from typing import Any

import torch

from preftune.errors import ConfigError


def inverse_scheduler(scheduler: Any, steps: int) -> Any:
    """A `DDIMInverseScheduler` on the training scheduler's schedule, set to `steps` inverse steps."""
    from diffusers import DDIMInverseScheduler

    if scheduler.config.get("prediction_type", "epsilon") != "epsilon":
        raise ConfigError("inversion (inpo) needs an ε-prediction model, as the official InPO script asserts")
    inverse = DDIMInverseScheduler.from_config(scheduler.config)
    inverse.set_timesteps(steps)
    return inverse


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
    """(x_t, ε target) of N clean latents [N, C, h, w] inverted by `model` up to their timesteps [N].

    noise[j]: the z added after inverse grid point j ([N, C, h, w], default fresh randn). Rows whose
    t is at or below a grid point stop there (their x_t is the last point below t, or x_0).
    """
    inverse = inverse_scheduler(scheduler, steps)
    ratio = int(scheduler.config.num_train_timesteps) // steps
    x = latents.clone()
    for j, tau in enumerate(int(v) for v in inverse.timesteps):
        active = timesteps > tau
        if not bool(active.any()):
            break
        rows = active.nonzero().flatten()
        t_rows = torch.full((len(rows),), tau, device=latents.device, dtype=torch.long)

        start, c_rows = x[rows], cond[rows]
        pred = model(start, t_rows, encoder_hidden_states=c_rows).sample.float()
        if renoise:
            ahead = inverse.step(pred, tau, start).prev_sample
            pred = 0.5 * (pred + model(ahead, t_rows, encoder_hidden_states=c_rows).sample.float())
        moved = inverse.step(pred, tau, start).prev_sample
        z = noise[j][rows] if noise is not None else torch.randn_like(moved)
        x[rows] = moved + eta * z * posterior_std(scheduler, tau + ratio)
    alpha = (
        scheduler.alphas_cumprod.to(latents.device)[timesteps].float().view(-1, *[1] * (latents.dim() - 1))
    )
    target = (x - alpha.sqrt() * latents) / (1.0 - alpha).sqrt()
    return x, target
