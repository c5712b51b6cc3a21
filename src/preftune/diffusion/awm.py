"""Advantage Weighted Matching for flow models (Xue et al. 2025, arXiv 2509.25050) (Python API).

AWM does not need the sampler's log-probs: the policy's "log-likelihood" of a generated sample x_0
is the (weighted) negative **pretraining** flow-matching loss on a freshly noised copy of it,

    x_s = (1 − s) x_0 + s ε,  target ε − x_0,  ℓ = mse(v_θ(x_s, s, c), ε − x_0),
    log p ≈ −w(ℓ, s),  ghuber: w = s · ((ℓ + 10⁻¹⁰)^p − 10^(−10p)) / p,  p = 0.25,

and the update is PPO-clip on ρ = exp(−w(ℓ_θ) + w(ℓ_old)) with group-standardised advantages, plus
β ‖v_θ − v_ref‖² against a frozen reference (the paper's KL in velocity space). Samples come from
any solver; here diffusers' `FlowMatchEulerDiscreteScheduler` (the rectified-flow ODE).

Models: `call(model, x, t, cond) → v` adapts the denoiser; the default (`seam.denoiser_output`) calls
a diffusers UNet as `model(x, t, encoder_hidden_states=cond).sample`, and an SD3-style
`SD3Transformer2DModel` on packed conditioning (`seam.pack_conditioning`: token rows, then the pooled
projections); `transformer_call(pooled)` adapts one whose pooled projections are given apart.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from preftune.diffusion.online import RewardFn, clip_and_step, ddpo_advantages
from preftune.diffusion.seam import denoiser_output
from preftune.errors import ConfigError
from preftune.losses.policy_losses import PolicyBatch, get_policy

__all__ = ["awm_log_likelihood", "awm_step", "sample_flow", "transformer_call", "unet_call"]

Call = Callable[[Any, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
WEIGHTINGS = ("uniform", "t", "ghuber")


def unet_call(model: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
    """v = model(x, t, encoder_hidden_states=cond).sample for a diffusers UNet or alike; an SD3-style
    transformer on packed conditioning (`seam.denoiser_output`)."""
    return denoiser_output(model, x, t, cond)


def transformer_call(pooled: torch.Tensor) -> Call:
    """A `call` for diffusers' SD3Transformer2DModel with pooled text projections `pooled` [N, P]."""

    def call(model: Any, x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        rows = pooled.expand(x.shape[0], -1) if pooled.shape[0] == 1 else pooled[: x.shape[0]]
        return model(hidden_states=x, timestep=t, encoder_hidden_states=cond, pooled_projections=rows).sample

    return call


@torch.no_grad()
def sample_flow(
    model: Any,
    scheduler: Any,
    cond: torch.Tensor,
    noise: torch.Tensor,
    num_steps: int,
    call: Call = unet_call,
) -> torch.Tensor:
    """Final latents of the flow ODE from `noise` (s = 1) with `scheduler` (Euler), [N, C, H, W]."""
    scheduler.set_timesteps(num_steps)
    x = noise
    for t in scheduler.timesteps:
        v = call(model, x, t.expand(x.shape[0]).to(x.device), cond)
        x = scheduler.step(v, t, x).prev_sample
    return x


def awm_log_likelihood(
    pred: torch.Tensor, target: torch.Tensor, s: torch.Tensor, weighting: str = "ghuber", power: float = 0.25
) -> torch.Tensor:
    """[N] −w(ℓ, s) of the module docstring (AWM's weighted matching log-likelihood), in float64."""
    mse = ((pred.double() - target.double()) ** 2).flatten(1).mean(dim=1)
    if weighting == "uniform":
        return -mse
    if weighting == "t":
        return -mse * s.double()
    if weighting == "ghuber":
        tiny = 1e-10
        return -((mse + tiny) ** power - tiny**power) * s.double() / power
    raise ConfigError(f"AWM weighting '{weighting}' is unknown; valid: {', '.join(WEIGHTINGS)}")


def awm_step(
    model: Any,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    cond: torch.Tensor,
    prompt_ids: torch.Tensor,
    reward_fn: RewardFn,
    *,
    noise: torch.Tensor,
    num_steps: int = 10,
    reference: Any | None = None,
    call: Call = unet_call,
    train_times: int = 4,
    weighting: str = "ghuber",
    clip_range: float = 1.0,
    beta: float = 0.002,
    generator: torch.Generator | None = None,
    max_grad_norm: float = 1.0,
) -> dict[str, float]:
    """One AWM iteration: sample with the ODE, reward, advantages standardised per prompt (clipped to
    ±5), then one optimiser step over `train_times` random s ~ U(0, 1) per sample."""
    final = sample_flow(model, scheduler, cond, noise, num_steps, call)
    rewards = reward_fn(final).detach().float()
    adv = ddpo_advantages(rewards, prompt_ids)
    n, total = final.shape[0], float(scheduler.config.get("num_train_timesteps", 1000))
    s = torch.rand((train_times, n), generator=generator).to(final.device)
    eps = torch.randn((train_times, *final.shape), generator=generator, dtype=final.dtype).to(final.device)
    spec = get_policy("ppo_clip")
    hp = spec.validate({"eps_low": clip_range, "eps_high": clip_range, "aggregation": "seq_mean_token_mean"})
    optimizer.zero_grad(set_to_none=True)
    kl_total = 0.0
    for m in range(train_times):
        sb = s[m].reshape(-1, *[1] * (final.dim() - 1))
        x_s, target = (1 - sb) * final + sb * eps[m], eps[m] - final
        pred = call(model, x_s, s[m] * total, cond)
        logp = awm_log_likelihood(pred, target, s[m], weighting)
        batch = PolicyBatch(logp[:, None], torch.ones((n, 1), dtype=torch.bool), adv, logp.detach()[:, None])
        loss = spec.fn(batch, {}, **hp).losses.mean()
        if reference is not None and beta > 0:
            with torch.no_grad():
                ref = call(reference, x_s, s[m] * total, cond)
            kl = ((pred.float() - ref.float()) ** 2).mean()
            loss = loss + beta * kl
            kl_total += float(kl.detach()) / train_times
        (loss / train_times).backward()
    clip_and_step(optimizer, [p for p in model.parameters() if p.requires_grad], max_grad_norm)
    return {"reward_mean": float(rewards.mean()), "kl": kl_total}
