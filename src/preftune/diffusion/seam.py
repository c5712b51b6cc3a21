"""The diffusion seam: one denoising pass → a per-image "log-prob" the loss zoo consumes.

Diffusion-DPO (Wallace et al. 2023, arXiv:2311.12908, Eq. 14) replaces the intractable
log-likelihood of an image by the denoising error at one noise level: with x_t from the forward
process, target the model's regression target at (x_0, ε, t),

    logp(x_0 | c) := −½ · mse(f_θ(x_t, t, c), target),   mse = mean over latent elements,

so ρ = logp_θ − logp_ref = −½ (mse_θ − mse_ref) and DPO's h = ρ_w − ρ_l = −½·d, with
d = (mse_θ^w − mse_ref^w) − (mse_θ^l − mse_ref^l). The registered `dpo` loss then reads
−log σ(−β/2 · d): exactly the official Diffusion-DPO loss with β in the paper's units (5000 for
SD 1.5; the diffusers research script folds the ½ into its β_dpo = 2500). Winner and loser of a
pair must share ε and t (`pair_noise`). The per-element mean (not the sum over latent elements)
is what every official script uses and what fixes the scale of β.

Targets: ε-prediction → ε; v-prediction → v = α_t ε − σ_t x_0 (`scheduler.get_velocity`);
rectified flow ("flow": x_t = (1 − s) x_0 + s ε, s = t / T) → ε − x_0.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from preftune.errors import ConfigError
from preftune.types import PreferenceBatch, SequenceStats

PredictionType = Literal["epsilon", "v_prediction", "flow"]
PREDICTION_TYPES: tuple[str, ...] = ("epsilon", "v_prediction", "flow")


@dataclass
class DenoisingStats:
    """Per-image statistics of one denoising pass of N images.

    mse: [N] float32, mean over latent elements of (prediction − target)².
    """

    mse: torch.Tensor

    @property
    def logps(self) -> torch.Tensor:
        """[N] the implicit log-likelihood statistic −½·mse."""
        return -0.5 * self.mse

    def sequence_stats(self) -> SequenceStats:
        """The statistics as the language side's `SequenceStats` (one "token" per image)."""
        ones = torch.ones(self.mse.shape, dtype=torch.int64, device=self.mse.device)
        return SequenceStats(logps=self.logps, lengths=ones)


def prediction_type_of(scheduler: Any) -> str:
    """The scheduler's prediction type: its config's `prediction_type`, or "flow" for flow-matching
    schedulers (which have none)."""
    config = getattr(scheduler, "config", {})
    kind = config.get("prediction_type") if hasattr(config, "get") else None
    if kind is None:
        return "flow" if "FlowMatch" in type(scheduler).__name__ else "epsilon"
    return str(kind)


def noisy_input_and_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, regression target) of clean latents x_0 at integer timesteps t with noise ε."""
    if prediction_type not in PREDICTION_TYPES:
        raise ConfigError(
            f"unknown prediction type '{prediction_type}'; valid: {', '.join(PREDICTION_TYPES)}"
        )
    if prediction_type == "flow":
        total = float(scheduler.config.get("num_train_timesteps", 1000))
        s = (timesteps.float() / total).to(latents.dtype).reshape(-1, *[1] * (latents.dim() - 1))
        return (1.0 - s) * latents + s * noise, noise - latents
    noisy = scheduler.add_noise(latents, noise, timesteps)
    if prediction_type == "epsilon":
        return noisy, noise
    return noisy, scheduler.get_velocity(latents, noise, timesteps)


def denoising_stats(
    unet: Any,
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    scheduler: Any,
    prediction_type: str | None = None,
    **model_kwargs: Any,
) -> DenoisingStats:
    """One denoising pass of N images: mse [N] of the model's prediction against its target.

    unet: a diffusers denoiser called as `unet(x_t, t, encoder_hidden_states=c, **model_kwargs)`
        (UNet2DConditionModel; transformers taking the same first arguments); output `.sample`.
    latents, noise: [N, C, H, W] clean latents x_0 and ε; timesteps: [N] integer t;
    encoder_hidden_states: [N, L, D], one row per image (DCPO gives a pair's two images different
    captions here). prediction_type defaults to the scheduler's.
    """
    if latents.shape != noise.shape:
        raise ConfigError(f"latents {tuple(latents.shape)} and noise {tuple(noise.shape)} differ in shape")
    n = latents.shape[0]
    if timesteps.shape != (n,) or encoder_hidden_states.shape[0] != n:
        raise ConfigError(
            f"{n} latents need {n} timesteps and {n} rows of encoder_hidden_states; got "
            f"{tuple(timesteps.shape)} and {tuple(encoder_hidden_states.shape)}"
        )
    kind = prediction_type or prediction_type_of(scheduler)
    noisy, target = noisy_input_and_target(latents, noise, timesteps, scheduler, kind)
    out = unet(noisy, timesteps, encoder_hidden_states=encoder_hidden_states, **model_kwargs)
    pred = out.sample if hasattr(out, "sample") else out[0]
    err = (pred.float() - target.float()) ** 2
    return DenoisingStats(mse=err.mean(dim=tuple(range(1, err.dim()))))


def pair_noise(
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [2E], noise [2E], timesteps [2E]) in row order [w_1..w_E, l_1..l_E]; the winner and
    the loser of a pair share ε and t (Diffusion-DPO; as the official scripts)."""
    if latents_w.shape != latents_l.shape:
        raise ConfigError(
            f"chosen latents {tuple(latents_w.shape)} and rejected latents {tuple(latents_l.shape)} "
            "differ in shape"
        )
    e = latents_w.shape[0]
    noise = torch.randn(latents_w.shape, generator=generator, dtype=latents_w.dtype)
    t = torch.randint(0, num_train_timesteps, (e,), generator=generator)
    device = latents_w.device
    return (
        torch.cat([latents_w, latents_l]),
        noise.repeat(2, *[1] * (noise.dim() - 1)).to(device),
        t.repeat(2).to(device),
    )


def branch_conditioning(encoder_hidden_states: torch.Tensor, pairs: int) -> torch.Tensor:
    """[2E, L, D] conditioning for rows [w..., l...]: a shared caption per pair ([E, L, D], repeated)
    or one per branch ([2E, L, D], DCPO: the winner's caption first, then the loser's)."""
    rows = encoder_hidden_states.shape[0]
    if rows == pairs:
        return encoder_hidden_states.repeat(2, *[1] * (encoder_hidden_states.dim() - 1))
    if rows == 2 * pairs:
        return encoder_hidden_states
    raise ConfigError(
        f"encoder_hidden_states has {rows} rows for {pairs} pairs: give {pairs} (one caption per pair) "
        f"or {2 * pairs} (winner captions, then loser captions)"
    )


def pair_batch(
    policy: DenoisingStats, reference: DenoisingStats | None = None, labels: torch.Tensor | None = None
) -> PreferenceBatch:
    """A pairwise `PreferenceBatch` [E, 2] from stats of rows [w_1..w_E, l_1..l_E]; labels: soft p."""
    n = policy.mse.shape[0]
    if n % 2:
        raise ConfigError(f"pair statistics need an even number of rows [winners, losers]; got {n}")

    def split(stats: DenoisingStats) -> torch.Tensor:
        chosen, rejected = stats.logps.chunk(2)
        return torch.stack([chosen, rejected], dim=1)

    logps = split(policy)
    return PreferenceBatch(
        policy_logps=logps,
        lengths=torch.ones(logps.shape, dtype=torch.int64, device=logps.device),
        ref_logps=None if reference is None else split(reference).detach(),
        labels=labels,
    )


def unpaired_batch(
    policy: DenoisingStats, reference: DenoisingStats | None, labels: torch.Tensor
) -> PreferenceBatch:
    """An unpaired `PreferenceBatch` [N, 1] (Diffusion-KTO) with 1 = liked, 0 = disliked per image."""
    logps = policy.logps[:, None]
    return PreferenceBatch(
        policy_logps=logps,
        lengths=torch.ones(logps.shape, dtype=torch.int64, device=logps.device),
        ref_logps=None if reference is None else reference.logps[:, None].detach(),
        labels=labels.float(),
    )
