"""Online diffusion RL with the stochastic sampler as the policy: DDPO and DPOK (Python API).

    policy = DDIMPolicy(pipe.scheduler, num_steps=50)          # η = 1
    # a flow-matching model: FlowSDEPolicy(pipe.scheduler, 50)  (Flow-GRPO's SDE, `flow_policy`)
    metrics = ddpo_step(unet, optimizer, policy, cond, prompt_ids, reward_fn, noise=noise)

Every step samples trajectories with the current weights (`sample_trajectory`), scores the final
latents with `reward_fn(latents) → [N]`, and updates on the stored actions. The advantage and the
clipped surrogate are the online loop's own: `preftune.rl.advantages("grpo", …)` and the `ppo_clip`
policy term, with the denoising steps of a chain in the role of a response's tokens.

Units: the official DDPO and DPOK code average each step's Gaussian log-density over the latent
elements (its clip range 1e-4 is in those units); the losses here do the same (`elements`).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from preftune import rl
from preftune.diffusion.policy import Trajectory, sample_trajectory, step_stats
from preftune.losses.policy_losses import PolicyBatch, get_policy
from preftune.losses.registry import LossOutput

if TYPE_CHECKING:
    from preftune.diffusion.policy import StochasticPolicy

__all__ = ["RewardFn", "clip_and_step", "ddpo_advantages", "ddpo_loss", "ddpo_step", "dpok_kl", "dpok_step"]

RewardFn = Callable[[torch.Tensor], torch.Tensor]


def ddpo_advantages(rewards: torch.Tensor, prompt_ids: torch.Tensor, clip: float = 5.0) -> torch.Tensor:
    """DDPO's per-prompt standardised rewards (Black et al. 2023, arXiv 2305.13301, the official
    code's per-prompt stat tracking), clipped to ±clip: A_i = clip((r_i − mean_p r)/(std_p r + 1e-4)).

    This is the `grpo` estimator of the online loop (unbiased group std, ε = 1e-4; DDPO's tracker
    uses the biased std + 1e-6 over a buffer of the prompt's recent rewards)."""
    return rl.advantages("grpo", rewards.float(), prompt_ids).clamp(-clip, clip)


def ddpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    advantages: torch.Tensor,
    elements: int,
    clip_range: float = 1e-4,
) -> LossOutput:
    """DDPO-clip (Black et al. 2023, eq. 4 with PPO's clipped surrogate, Schulman et al. 2017, eq. 7)
    over denoising steps: per chain, the mean over its K steps of
    −min(ρ_k A, clip(ρ_k, 1 ± clip_range) A), ρ_k = exp((log π_θ − log π_old)/d).

    logps, old_logps: [N, K] summed step log-densities (this module's `Trajectory.logps` units);
    advantages: [N] (DDPO) or [N, K] (per step, DPOK). Returns losses [N] and clip metrics."""
    batch = PolicyBatch(
        policy_token_logps=logps / elements,
        mask=torch.ones(logps.shape, dtype=torch.bool, device=logps.device),
        advantages=advantages,
        old_token_logps=old_logps / elements,
    )
    spec = get_policy("ppo_clip")
    hp = spec.validate({"eps_low": clip_range, "eps_high": clip_range, "aggregation": "seq_mean_token_mean"})
    return spec.fn(batch, {}, **hp)


def clip_and_step(optimizer: torch.optim.Optimizer, params: Any, max_grad_norm: float) -> float:
    norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(norm)


def ddpo_step(
    unet: Any,
    optimizer: torch.optim.Optimizer,
    policy: StochasticPolicy,
    cond: torch.Tensor,
    prompt_ids: torch.Tensor,
    reward_fn: RewardFn,
    *,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    inner_epochs: int = 1,
    clip_range: float = 1e-4,
    adv_clip: float = 5.0,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One DDPO iteration: sample N chains from `noise` [N, C, H, W] under `cond` [N, L, D], reward
    them, and take `inner_epochs` optimiser steps on `ddpo_loss`, each accumulating the gradient one
    denoising step at a time (memory of one UNet pass). `prompt_ids` [N] groups chains by prompt."""
    traj = sample_trajectory(unet, policy, cond, noise, generator)
    rewards = reward_fn(traj.final).detach().float()
    adv = ddpo_advantages(rewards, prompt_ids, adv_clip)
    params = [p for p in unet.parameters() if p.requires_grad]
    clip_fraction = 0.0
    for _ in range(inner_epochs):
        optimizer.zero_grad(set_to_none=True)
        for k in range(policy.num_steps):
            logp = step_stats(unet, policy, traj, k)[0][:, None]
            out = ddpo_loss(logp, traj.logps[:, k : k + 1], adv, traj.elements, clip_range)
            (out.losses.mean() / policy.num_steps).backward()
            clip_fraction += float(out.metrics["clip_fraction"].mean()) / (policy.num_steps * inner_epochs)
        clip_and_step(optimizer, params, max_grad_norm)
    return {"reward_mean": float(rewards.mean()), "clip_fraction": clip_fraction}


def dpok_kl(eps: torch.Tensor, eps_pretrained: torch.Tensor) -> torch.Tensor:
    """[N] DPOK's per-step KL term (Fan et al. 2023, arXiv 2305.16381, Lemma 4.2): the KL of two
    Gaussian steps with the same σ is ‖μ_θ − μ_pre‖²/(2σ²) = c_t ‖ε_θ − ε_pre‖²; as the official
    code, c_t is dropped (absorbed in the KL weight) and the squared error is averaged over
    elements."""
    return ((eps.float() - eps_pretrained.float()) ** 2).flatten(1).mean(dim=1)


def _value_update(
    value: Any,
    value_optimizer: torch.optim.Optimizer,
    policy: StochasticPolicy,
    traj: Trajectory,
    rewards: torch.Tensor,
) -> tuple[torch.Tensor, float]:
    """Fit the value baseline V(x_k, t_k, c) ≈ r on every step of the chains (one MSE step) and
    return its predictions before the update [N, K] (detached) and the loss."""
    steps = range(policy.num_steps)
    preds = torch.stack([value(traj.latents[k], traj.timesteps[k], traj.cond) for k in steps], dim=1)
    loss = ((preds - rewards[:, None]) ** 2).mean()
    value_optimizer.zero_grad(set_to_none=True)
    loss.backward()
    value_optimizer.step()
    return preds.detach(), float(loss.detach())


def dpok_step(
    unet: Any,
    pretrained: Any,
    value: Any,
    optimizer: torch.optim.Optimizer,
    value_optimizer: torch.optim.Optimizer,
    policy: StochasticPolicy,
    cond: torch.Tensor,
    reward_fn: RewardFn,
    *,
    noise: torch.Tensor,
    generator: torch.Generator | None = None,
    reward_weight: float = 10.0,
    kl_weight: float = 0.01,
    clip_range: float = 1e-4,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One DPOK iteration (Fan et al. 2023, Algorithm 1): sample, reward, update the value baseline,
    then the policy on reward_weight · (r − V(x_k, t_k, c)) per step through the clipped ratio, plus
    kl_weight · `dpok_kl` against the frozen `pretrained` denoiser."""
    traj = sample_trajectory(unet, policy, cond, noise, generator)
    rewards = reward_fn(traj.final).detach().float()
    baseline, value_loss = _value_update(value, value_optimizer, policy, traj, rewards)
    adv = reward_weight * (rewards[:, None] - baseline)
    params = [p for p in unet.parameters() if p.requires_grad]
    optimizer.zero_grad(set_to_none=True)
    kl_total = 0.0
    for k in range(policy.num_steps):
        logp, eps = step_stats(unet, policy, traj, k)
        with torch.no_grad():
            eps_pre = policy.predict(pretrained, traj.latents[k], k, traj.cond)
        out = ddpo_loss(logp[:, None], traj.logps[:, k : k + 1], adv[:, k : k + 1], traj.elements, clip_range)
        kl = dpok_kl(eps, eps_pre)
        ((out.losses + kl_weight * kl).mean() / policy.num_steps).backward()
        kl_total += float(kl.detach().mean()) / policy.num_steps
    clip_and_step(optimizer, params, max_grad_norm)
    return {"reward_mean": float(rewards.mean()), "value_loss": value_loss, "kl": kl_total}
