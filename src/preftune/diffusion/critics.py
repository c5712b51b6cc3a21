"""Small scorers of noisy latents f(x_t, t, c) → scalar: DPOK's value baseline and SPO's step-aware
preference model are both functions of the state of the denoising MDP.

`LatentCritic` is a two-layer conv net over the latent, a sinusoidal embedding of t / T and the mean
of the text embedding, joined by an MLP. It is deliberately small (the trained models of the papers
are a CLIP-based value head and a PickScore fine-tuned on noisy latents); any `nn.Module` with the
same call `critic(x_t, t, cond) → [N]` can take its place.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from preftune.diffusion.seam import noisy_input_and_target, pair_noise, prediction_type_of

__all__ = ["LatentCritic", "step_preference_loss"]


def time_features(t: torch.Tensor, dim: int, total: int = 1000) -> torch.Tensor:
    """[N, dim] sin/cos features of t / total at geometric frequencies 1 … 1000."""
    half = dim // 2
    freqs = torch.exp(torch.linspace(0.0, math.log(1000.0), half, device=t.device))
    angle = (t.float() / total)[:, None] * freqs[None]
    return torch.cat([angle.sin(), angle.cos()], dim=1)


class LatentCritic(nn.Module):
    """critic(x_t [N, C, H, W], t [N] or scalar, cond [N, L, D]) → [N] scores."""

    def __init__(self, channels: int, text_dim: int, hidden: int = 32, total_timesteps: int = 1000) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, hidden, 3, padding=1)
        self.conv2 = nn.Conv2d(hidden, hidden, 3, padding=1, stride=2)
        self.text = nn.Linear(text_dim, hidden)
        self.head = nn.Sequential(nn.Linear(4 * hidden, hidden), nn.SiLU(), nn.Linear(hidden, 1))
        self.hidden, self.total = hidden, total_timesteps

    def forward(self, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        t = torch.as_tensor(t, device=x.device).reshape(-1).expand(n)
        h = F.silu(self.conv2(F.silu(self.conv1(x))))
        pooled = torch.cat([h.mean(dim=(2, 3)), h.flatten(2).std(dim=2)], dim=1)
        feats = torch.cat([pooled, self.text(cond.mean(dim=1)), time_features(t, self.hidden, self.total)], 1)
        return self.head(feats).squeeze(1)


def step_preference_loss(
    critic: Any,
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    cond: torch.Tensor,
    scheduler: Any,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """SPO's step-aware preference model objective (Liang et al. 2024, arXiv 2406.04314, §4.1):
    the Bradley–Terry loss −log σ(f(x_t^w, t, c) − f(x_t^l, t, c)) on a pair of clean latents noised
    to the same random t with the same ε (the pair shares its noise, as in Diffusion-DPO). Returns
    the mean over the E pairs; cond: [E, L, D]. On a flow-matching scheduler x_t = (1 − σ) x_0 + σ ε
    with t = σ·T drawn as the offline runs draw it (`seam.draw_timesteps`)."""
    total = int(scheduler.config.get("num_train_timesteps", 1000))
    latents, noise, t = pair_noise(latents_w, latents_l, total, generator, scheduler=scheduler)
    noisy = noisy_input_and_target(latents, noise, t, scheduler, prediction_type_of(scheduler))[0]
    scores = critic(noisy, t, cond.repeat(2, 1, 1))
    s_w, s_l = scores.chunk(2)
    return -F.logsigmoid(s_w - s_l).mean()
