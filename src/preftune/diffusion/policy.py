"""The stochastic DDIM sampler as a policy with exact per-step Gaussian log-probs.

Denoising with DDIM at η > 0 (Song et al. 2021, arXiv 2010.02502, eq. 12) is a Markov decision
process (Black et al. 2023, DDPO, arXiv 2305.13301, §4.1): state (c, t_k, x_{t_k}), action
x_{t_{k+1}} (the next, less noisy latent), policy the Gaussian step

    π_θ(x_prev | x_t, c) = N(μ_θ, σ_t² I),
    μ_θ = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev − σ_t²) · ε_θ,     x̂_0 = (x_t − √(1 − ᾱ_t) ε_θ)/√ᾱ_t,
    σ_t = η · √((1 − ᾱ_prev)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_prev)          (eq. 16),

whose log-density is exact: log π = −‖x_prev − μ_θ‖²/(2σ_t²) − d·log σ_t − (d/2)·log 2π, summed
over the d latent elements (`step_log_prob`). DDPO's official code averages over the elements
instead (its clip range 1e-4 is in those units): `Trajectory.elements` holds d for that.

With η = 1 this is DDPM's ancestral sampler on the DDIM grid. The grid is diffusers'
`DDIMScheduler` on the pipeline's scheduler config with `set_alpha_to_one=False` (as Stable
Diffusion's own config: with ᾱ_final = 1 the last step would be deterministic and have no density);
x_prev of the last step is the final latent.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from preftune.errors import ConfigError

if TYPE_CHECKING:
    from typing import TypeAlias

    from preftune.diffusion.flow_policy import FlowSDEPolicy

    # what the samplers, DDPO/DPOK, D3PO/SPO and DTS take: DDIM η, or Flow-GRPO's SDE on a flow
    StochasticPolicy: TypeAlias = "DDIMPolicy | FlowSDEPolicy"

__all__ = [
    "DDIMPolicy",
    "Trajectory",
    "sample_trajectory",
    "step_log_prob",
    "step_stats",
    "trajectory_log_probs",
]


@dataclass
class Trajectory:
    """N sampled reverse chains of K steps.

    latents: [K + 1, N, C, H, W] x at t_0 (pure noise) … the final latent at index K.
    timesteps: [K] integer t_k at which step k evaluates the model.
    logps: [N, K] exact log π(x_{k+1} | x_k, c) under the sampling weights (no gradient).
    cond: [N, L, D] the conditioning each chain was sampled with.
    """

    latents: torch.Tensor
    timesteps: torch.Tensor
    logps: torch.Tensor
    cond: torch.Tensor

    @property
    def final(self) -> torch.Tensor:
        """[N, C, H, W] the sampled latents."""
        return self.latents[-1]

    @property
    def elements(self) -> int:
        """d, the number of latent elements per image."""
        return int(self.latents[0, 0].numel())


class DDIMPolicy:
    """The DDIM η-sampler on `num_steps` steps of a diffusers scheduler config.

    guidance_scale > 1 with `uncond` ([1, L, D] or [N, L, D] empty-prompt embeddings) applies
    classifier-free guidance ε = ε_u + w (ε_c − ε_u) (Ho & Salimans 2022, eq. 6) inside the policy.
    """

    def __init__(
        self,
        scheduler: Any,
        num_steps: int,
        eta: float = 1.0,
        guidance_scale: float = 1.0,
        uncond: torch.Tensor | None = None,
    ) -> None:
        from diffusers import DDIMScheduler

        if num_steps < 1:
            raise ConfigError(f"num_steps = {num_steps}: the sampler needs at least 1 step")
        if eta <= 0:
            raise ConfigError(f"eta = {eta}: the policy needs a stochastic sampler (eta > 0; DDPO uses 1)")
        if guidance_scale != 1.0 and uncond is None:
            raise ConfigError("guidance_scale != 1 needs uncond= (the empty prompt's embeddings)")
        # the last step must stay stochastic for its density to exist: end at ᾱ_0, not at 1 (as SD)
        config = {k: v for k, v in scheduler.config.items() if not k.startswith("_")}
        config["set_alpha_to_one"] = False
        self.ddim = DDIMScheduler.from_config(config)
        self.ddim.set_timesteps(num_steps)
        self.prediction_type = str(config.get("prediction_type", "epsilon"))
        if self.prediction_type not in ("epsilon", "v_prediction"):
            raise ConfigError(f"prediction_type '{self.prediction_type}': the DDIM policy needs epsilon or v")
        self.timesteps = self.ddim.timesteps.clone()
        self.num_steps, self.eta = num_steps, float(eta)
        self.guidance_scale, self.uncond = float(guidance_scale), uncond
        self.stride = int(config.get("num_train_timesteps", 1000)) // num_steps

    def alphas(self, k: int) -> tuple[float, float]:
        """(ᾱ_t, ᾱ_prev) of step k; the last step ends at the scheduler's final ᾱ."""
        t = int(self.timesteps[k])
        ac = self.ddim.alphas_cumprod
        prev = t - self.stride
        a_prev = ac[prev] if prev >= 0 else self.ddim.final_alpha_cumprod
        return float(ac[t]), float(a_prev)

    def predict(self, unet: Any, x: torch.Tensor, k: int, cond: torch.Tensor) -> torch.Tensor:
        """ε_θ(x, t_k, c) (guided when guidance_scale != 1; v-predictions converted to ε)."""
        t = self.timesteps[k].to(x.device)
        if self.guidance_scale != 1.0:
            assert self.uncond is not None
            uncond = self.uncond.expand(cond.shape[0], *self.uncond.shape[1:]).to(cond)
            out = unet(torch.cat([x, x]), t, encoder_hidden_states=torch.cat([uncond, cond])).sample
            e_u, e_c = out.chunk(2)
            out = e_u + self.guidance_scale * (e_c - e_u)
        else:
            out = unet(x, t, encoder_hidden_states=cond).sample
        if self.prediction_type == "v_prediction":
            a = self.alphas(k)[0]
            out = math.sqrt(a) * out + math.sqrt(1 - a) * x
        return out

    def next_timestep(self, k: int) -> torch.Tensor:
        """t of the state after step k (what SPO's scorer sees its candidates at)."""
        return torch.tensor(max(int(self.timesteps[k]) - self.stride, 0))

    def x0_at(self, unet: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x̂_0 = (x − √(1 − ᾱ_t) ε_θ)/√ᾱ_t at an integer timestep t (v converted to ε, no guidance)."""
        from preftune.diffusion.inversion import epsilon_of

        step = int(t)
        a = float(self.ddim.alphas_cumprod[step])
        out = unet(x, torch.tensor(step), encoder_hidden_states=cond).sample
        eps = epsilon_of(out, x, a, self.prediction_type)
        return (x - (1 - a) ** 0.5 * eps) / a**0.5

    def mean_std(self, eps: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
        """(μ_θ, σ_t) of step k given ε_θ at x (Song et al. 2021, eq. 12 and 16)."""
        a, a_prev = self.alphas(k)
        std = self.eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        mean = math.sqrt(a_prev) * x0 + math.sqrt(max(1 - a_prev - std * std, 0.0)) * eps
        return mean, std


def step_log_prob(x_prev: torch.Tensor, mean: torch.Tensor, std: float) -> torch.Tensor:
    """[N] exact log N(x_prev; mean, std² I), summed over each row's elements, in float64."""
    d = x_prev[0].numel()
    sq = ((x_prev.double() - mean.double()) ** 2).flatten(1).sum(dim=1)
    return -sq / (2 * std * std) - d * math.log(std) - 0.5 * d * math.log(2 * math.pi)


@torch.no_grad()
def sample_trajectory(
    unet: Any,
    policy: StochasticPolicy,
    cond: torch.Tensor,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
) -> Trajectory:
    """Run the policy from `noise` [N, C, H, W] (x at t_0) with conditioning `cond` [N, L, D]."""
    if noise.shape[0] != cond.shape[0]:
        raise ConfigError(
            f"{noise.shape[0]} noise rows need {noise.shape[0]} rows of cond, got {cond.shape[0]}"
        )
    x, states, logps = noise, [noise], []
    for k in range(policy.num_steps):
        mean, std = policy.mean_std(policy.predict(unet, x, k, cond), x, k)
        z = torch.randn(x.shape, generator=generator, dtype=x.dtype).to(x.device)
        x = mean + std * z
        logps.append(step_log_prob(x, mean, std))
        states.append(x)
    return Trajectory(torch.stack(states), policy.timesteps.clone(), torch.stack(logps, dim=1), cond)


def step_stats(
    unet: Any, policy: StochasticPolicy, trajectory: Trajectory, k: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(log π_θ(x_{k+1} | x_k, c) [N], ε_θ(x_k, t_k, c)) of step k under `unet`'s current weights."""
    x, x_prev = trajectory.latents[k], trajectory.latents[k + 1]
    eps = policy.predict(unet, x, k, trajectory.cond)
    mean, std = policy.mean_std(eps, x, k)
    return step_log_prob(x_prev, mean, std), eps


def trajectory_log_probs(
    unet: Any, policy: StochasticPolicy, trajectory: Trajectory, steps: list[int] | None = None
) -> torch.Tensor:
    """[N, len(steps)] log π_θ(x_{k+1} | x_k, c) of the stored actions under `unet`'s current weights
    (differentiable). Under the sampling weights it equals `trajectory.logps` (the PPO ratio is 1)."""
    chosen = list(range(policy.num_steps)) if steps is None else steps
    return torch.stack([step_stats(unet, policy, trajectory, k)[0] for k in chosen], dim=1)
