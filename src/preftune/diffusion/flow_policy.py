"""The rectified-flow SDE sampler as a policy with exact per-step Gaussian log-probs (Flow-GRPO).

A flow-matching model's sampler is an ODE, dx/dσ = v_θ(x, σ), and has no step density. Flow-GRPO
(Liu et al. 2025, "Flow-GRPO: Training Flow Matching Models via Online RL", arXiv 2505.05470, the
ODE-to-SDE conversion) replaces it by the reverse SDE with the same marginals at every σ. For the
rectified flow x_σ = (1 − σ) x_0 + σ ε the score is ∇log p_σ(x) = −(x + (1 − σ) v)/σ, and the
Euler–Maruyama step from σ to σ' < σ (dt = σ' − σ < 0) is the paper's update

    x' = x + [v_θ + σ_t²/(2σ) · (x + (1 − σ) v_θ)] · dt + σ_t √(−dt) · z,    z ~ N(0, I),
    σ_t = a · √(σ / (1 − σ)),    a = `noise_level` (0.7 in the paper),

a Gaussian step N(μ_θ, (σ_t √(−dt))² I) whose log-density is exact (`policy.step_log_prob`). As the
official `sde_step_with_logprob`, the 1 − σ of σ_t's denominator is 1 − σ_1 at the first step
(σ_0 = 1 would divide by zero); the grid is diffusers' `FlowMatchEulerDiscreteScheduler` on the
pipeline's config (its shift included), ending at σ = 0, so the last step is stochastic too.

`FlowSDEPolicy` has `DDIMPolicy`'s interface (`predict`, `mean_std`, `timesteps`, `num_steps`), so
`policy.sample_trajectory`, `step_stats`, `trajectory_log_probs`, DDPO, DPOK, D3PO, SPO and DTS run
on it unchanged. Where those use ε_θ (DPOK's KL ‖ε_θ − ε_pre‖²), they get v_θ: two steps with the same
σ differ in mean by a σ-only multiple of v_θ − v_pre, so the KL is c_σ ‖v_θ − v_pre‖² and DPOK's
dropped constant absorbs c_σ exactly as it absorbs c_t on DDIM.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from preftune.diffusion.seam import denoiser_output, prediction_type_of
from preftune.errors import ConfigError

__all__ = ["FlowSDEPolicy", "make_policy"]


class FlowSDEPolicy:
    """Flow-GRPO's SDE sampler on `num_steps` steps of a flow-matching scheduler config."""

    prediction_type = "flow"

    def __init__(self, scheduler: Any, num_steps: int, noise_level: float = 0.7) -> None:
        from diffusers import FlowMatchEulerDiscreteScheduler

        if num_steps < 1:
            raise ConfigError(f"num_steps = {num_steps}: the sampler needs at least 1 step")
        if noise_level <= 0:
            raise ConfigError(
                f"noise_level = {noise_level}: the policy needs a stochastic sampler (> 0; Flow-GRPO uses 0.7)"
            )
        grid = FlowMatchEulerDiscreteScheduler.from_config(scheduler.config)
        grid.set_timesteps(num_steps)
        self.sigmas = [float(s) for s in grid.sigmas]  # num_steps + 1 levels, the last 0
        self.total = float(scheduler.config.get("num_train_timesteps", 1000))
        self.timesteps = grid.timesteps.clone()  # t_k = σ_k · T, what the model is called with
        self.num_steps, self.noise_level = num_steps, float(noise_level)

    def sigma(self, k: int) -> float:
        return self.sigmas[k]

    def predict(self, model: Any, x: torch.Tensor, k: int, cond: torch.Tensor) -> torch.Tensor:
        """v_θ(x, t_k, c) (`seam.denoiser_output`: a UNet, or an SD3 transformer on packed c)."""
        t = self.timesteps[k].to(x.device).expand(x.shape[0])
        return denoiser_output(model, x, t, cond)

    def step_std(self, k: int) -> float:
        """σ_t · √(−dt) of step k (module docstring)."""
        sigma, nxt = self.sigmas[k], self.sigmas[k + 1]
        below = sigma if sigma < 1 else self.sigmas[1]
        return self.noise_level * math.sqrt(sigma / (1 - below)) * math.sqrt(sigma - nxt)

    def mean_std(self, v: torch.Tensor, x: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
        """(μ_θ, σ_t √(−dt)) of step k given v_θ at x (the module docstring's update)."""
        sigma, dt = self.sigmas[k], self.sigmas[k + 1] - self.sigmas[k]
        std = self.step_std(k)
        var_t = std * std / -dt  # σ_t²
        mean = x + (v + var_t / (2 * sigma) * (x + (1 - sigma) * v)) * dt
        return mean, std

    def next_timestep(self, k: int) -> torch.Tensor:
        """t of the state after step k (what SPO's scorer sees its candidates at)."""
        return torch.tensor(self.sigmas[k + 1] * self.total)

    def x0_at(self, model: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        """x̂_0 = x − σ v_θ(x, t, c), σ = t / T (the rectified flow's clean-sample prediction)."""
        steps = torch.as_tensor(t, dtype=torch.float32, device=x.device).reshape(-1).expand(x.shape[0])
        sigma = (steps / self.total).reshape(-1, *[1] * (x.dim() - 1)).to(x.dtype)
        return x - sigma * denoiser_output(model, x, steps, cond)


def make_policy(scheduler: Any, num_steps: int, eta: float = 1.0, noise_level: float = 0.7) -> Any:
    """The stochastic policy of a pipeline's scheduler: `FlowSDEPolicy` (noise level a) for a
    flow-matching one, else `policy.DDIMPolicy` (DDIM η)."""
    from preftune.diffusion.policy import DDIMPolicy

    if prediction_type_of(scheduler) == "flow":
        return FlowSDEPolicy(scheduler, num_steps, noise_level=noise_level)
    return DDIMPolicy(scheduler, num_steps, eta=eta)
