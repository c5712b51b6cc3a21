"""ReNO: reward-based noise optimisation for one-step models (Eyring et al. NeurIPS 2024,
arXiv 2406.04312) (Python API).

A one-step generator x = G(ε, c) is differentiable in its initial noise ε, so ReNO improves an image
at inference time by gradient ascent on ε for a weighted sum of differentiable rewards, keeping ε
likely under N(0, I) with ReNO's regulariser on its norm: ‖ε‖ of a d-dimensional
standard normal follows the χ_d law, whose negative log-density up to a constant is

    reg(ε) = ½‖ε‖² − (d − 1) log ‖ε‖          (minimal at ‖ε‖ = √(d − 1)),

and ReNO minimises  L(ε) = −Σ_i λ_i R_i(G(ε)) + λ_reg · reg(ε)  with SGD (lr 5, Nesterov momentum
0.9), the gradient norm clipped to 0.1, for 50 iterations, returning the noise with the best
reward seen (not the last one). Each row of a batch is its own problem (the losses add up; the
clip is per row, as a batch of independent runs).

`one_step_generator(unet, scheduler, cond)` is G for a diffusers ε-prediction UNet: the x̂_0
prediction from the top timestep (what a timestep-distilled model such as SD-Turbo does in one
step); decode it with the pipeline's VAE inside the reward for pixel rewards.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.errors import ConfigError

__all__ = ["RenoResult", "norm_regulariser", "one_step_generator", "reno"]

Generator = Callable[[torch.Tensor], torch.Tensor]
Reward = Callable[[torch.Tensor], torch.Tensor]


def norm_regulariser(noise: torch.Tensor) -> torch.Tensor:
    """[N] ½‖ε‖² − (d − 1) log ‖ε‖ per row (the χ_d negative log-density up to a constant)."""
    d = noise[0].numel()
    norm = noise.flatten(1).norm(dim=1)
    return 0.5 * norm**2 - (d - 1) * torch.log(norm + 1e-6)


def one_step_generator(
    unet: Any, scheduler: Any, cond: torch.Tensor, timestep: int | None = None
) -> Generator:
    """G(ε) = x̂_0 = (ε − √(1 − ᾱ_t) ε_θ(ε, t, c)) / √ᾱ_t at the top timestep t (default T − 1)."""
    t = int(scheduler.config.get("num_train_timesteps", 1000)) - 1 if timestep is None else timestep
    a = float(scheduler.alphas_cumprod[t])

    def generate(noise: torch.Tensor) -> torch.Tensor:
        steps = torch.full((noise.shape[0],), t, dtype=torch.long, device=noise.device)
        eps = unet(noise, steps, encoder_hidden_states=cond).sample
        return (noise - (1 - a) ** 0.5 * eps) / a**0.5

    return generate


@dataclass
class RenoResult:
    """The best noise per row [N, …], its images and rewards [N], and the mean reward per iteration."""

    noise: torch.Tensor
    images: torch.Tensor
    rewards: torch.Tensor
    history: list[float] = field(default_factory=list)


def _total_reward(images: torch.Tensor, rewards: Sequence[tuple[Reward, float]]) -> torch.Tensor:
    total = images.new_zeros(images.shape[0], dtype=torch.float32)
    for fn, weight in rewards:
        total = total + weight * fn(images).float()
    return total


def reno(
    generate: Generator,
    rewards: Sequence[tuple[Reward, float]],
    noise: torch.Tensor,
    *,
    iterations: int = 50,
    lr: float = 5.0,
    momentum: float = 0.9,
    grad_clip: float = 0.1,
    reg_weight: float = 0.01,
) -> RenoResult:
    """Optimise `noise` [N, …] for Σ λ_i R_i(generate(noise)) (`rewards`: pairs (R_i, λ_i), each R_i
    maps images to [N]); returns the best noise seen per row (the module docstring's procedure)."""
    if iterations < 1 or not rewards:
        raise ConfigError("reno needs iterations >= 1 and at least one (reward, weight) pair")
    eps = noise.detach().clone().requires_grad_(True)
    opt = torch.optim.SGD([eps], lr=lr, momentum=momentum, nesterov=True)
    best = RenoResult(noise.detach().clone(), torch.empty(0), torch.full((noise.shape[0],), -torch.inf))
    for _ in range(iterations + 1):
        images = generate(eps)
        score = _total_reward(images, rewards)
        better = score.detach() > best.rewards
        if bool(better.any()):
            best.noise[better] = eps.detach()[better]
            best.rewards = torch.where(better, score.detach(), best.rewards)
            keep = images.detach() if best.images.numel() == 0 else best.images
            keep[better] = images.detach()[better]
            best.images = keep
        best.history.append(float(score.detach().mean()))
        if len(best.history) > iterations:
            break
        loss = (-score + reg_weight * norm_regulariser(eps)).sum()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        assert eps.grad is not None
        norms = eps.grad.flatten(1).norm(dim=1).clamp(min=1e-12)
        scale = (grad_clip / norms).clamp(max=1.0).reshape(-1, *[1] * (eps.dim() - 1))
        eps.grad.mul_(scale)
        opt.step()
    return best
