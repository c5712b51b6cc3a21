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
rectified flow ("flow": x_t = (1 − σ) x_0 + σ ε, σ = t / T) → v = ε − x_0.

Rectified flow (SD3-style transformers). With the flow target the statistic is −½·mse(v_θ, ε − x_0)
and the registered `dpo` loss is Flow-DPO (Liu et al. 2025, "Improving Video Generation with Human
Feedback", arXiv:2501.13918) with a constant β: carried over from Diffusion-DPO's ELBO the KL weight
becomes timestep-dependent, which the paper finds over-optimises the noisiest levels (reward
hacking), so it keeps β constant — as here. Training σ are drawn as diffusers' SD3 scripts draw
them (`train_dreambooth_sd3.py`, `train_dreambooth_lora_sd3.py`: default `--weighting_scheme
logit_normal`, mean 0, std 1, the rf/lognorm(0, 1) sampler Esser et al. 2024, arXiv:2403.03206,
rank best): u = sigmoid(n), n ~ N(0, 1), index ⌊u·T⌋ into the scheduler's training grid, whose σ
are already shifted (SD3: shift 3), t = σ·T (`draw_timesteps`). Logit-normal rather than uniform
because it is what SD3 was trained with, so the statistic weights noise levels as pretraining did;
that scheme's loss weight is 1, so the statistic is the plain per-element mean. Not followed:
`train_dreambooth_sd3.py`'s `--precondition_outputs 1` (compare x_t − σ v_θ with x_0), which
multiplies each mse by σ², i.e. a per-example β_t = β σ² — the timestep weighting Flow-DPO drops.

Conditioning of a pooled-projection transformer (SD3Transformer2DModel) travels as one tensor,
[N, L + 1, D]: the L token rows of `encode_prompt`'s prompt_embeds, then one row holding the pooled
projections (zero-padded to D) — `pack_conditioning` / `unpack_conditioning` — so caching, batching
and DCPO's per-branch captions treat it as they treat a UNet's [N, L, D] (`denoiser_output`).
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


def draw_timesteps(
    scheduler: Any, n: int, generator: torch.Generator | None = None, prediction_type: str | None = None
) -> torch.Tensor:
    """[n] training timesteps: uniform integers in [0, T) (DDPM training, Diffusion-DPO), or for a
    flow-matching scheduler t = σ·T with σ from diffusers' SD3 logit-normal scheme (module docstring;
    `compute_density_for_timestep_sampling("logit_normal", mean 0, std 1)`)."""
    total = int(scheduler.config.get("num_train_timesteps", 1000))
    if (prediction_type or prediction_type_of(scheduler)) != "flow":
        return torch.randint(0, total, (n,), generator=generator)
    from diffusers.training_utils import compute_density_for_timestep_sampling

    u = compute_density_for_timestep_sampling("logit_normal", n, 0.0, 1.0, generator=generator)
    index = (u * total).long().clamp(0, total - 1)
    return training_timesteps(scheduler)[index]


def training_timesteps(scheduler: Any) -> torch.Tensor:
    """[T] the flow scheduler's training grid t = σ·T (shifted σ, descending), as built by a fresh
    scheduler from its config (so a scheduler already set for sampling still trains right)."""
    fresh = type(scheduler).from_config(scheduler.config)
    return fresh.timesteps.float()


def pack_conditioning(embeds: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
    """[N, L + 1, D]: token embeddings [N, L, D] and, as the last row, pooled projections [N, P ≤ D]
    zero-padded to D (the form a pooled-projection transformer's conditioning travels in)."""
    width = embeds.shape[-1]
    if pooled.shape[-1] > width:
        raise ConfigError(
            f"pooled projections of width {pooled.shape[-1]} do not fit a conditioning row of width "
            f"{width}: this transformer's pooled_projection_dim exceeds its joint_attention_dim"
        )
    row = torch.nn.functional.pad(pooled, (0, width - pooled.shape[-1]))
    return torch.cat([embeds, row[:, None, :].to(embeds.dtype)], dim=1)


def unpack_conditioning(cond: torch.Tensor, pooled_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(token embeddings [N, L, D], pooled projections [N, pooled_dim]) of `pack_conditioning`'s form."""
    return cond[:, :-1], cond[:, -1, :pooled_dim]


def pooled_projection_dim(model: Any) -> int | None:
    """The width of the pooled text projections a transformer denoiser takes; None for a UNet."""
    config = getattr(model, "config", None)
    dim = getattr(config, "pooled_projection_dim", None)
    return None if dim is None else int(dim)


def denoiser_output(
    model: Any, noisy: torch.Tensor, timesteps: torch.Tensor, cond: torch.Tensor, **model_kwargs: Any
) -> torch.Tensor:
    """The denoiser's prediction at (x_t, t, c): a UNet as `model(x_t, t, encoder_hidden_states=c)`,
    a pooled-projection transformer (SD3) with c unpacked into its tokens and pooled projections."""
    dim = pooled_projection_dim(model)
    if dim is None:
        out = model(noisy, timesteps, encoder_hidden_states=cond, **model_kwargs)
    else:
        tokens, pooled = unpack_conditioning(cond, dim)
        out = model(
            hidden_states=noisy,
            timestep=timesteps,
            encoder_hidden_states=tokens,
            pooled_projections=pooled,
            **model_kwargs,
        )
    return out.sample if hasattr(out, "sample") else out[0]  # type: ignore[no-any-return]


def noisy_input_and_target(
    latents: torch.Tensor,
    noise: torch.Tensor,
    timesteps: torch.Tensor,
    scheduler: Any,
    prediction_type: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, regression target) of clean latents x_0 at timesteps t with noise ε (integers for DDPM
    schedules; t = σ·T, possibly fractional, for flow matching)."""
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

    unet: a diffusers denoiser (`denoiser_output`): a UNet2DConditionModel, or an SD3-style
        transformer whose `encoder_hidden_states` are packed (`pack_conditioning`).
    latents, noise: [N, C, H, W] clean latents x_0 and ε; timesteps: [N] t (`draw_timesteps`);
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
    pred = denoiser_output(unet, noisy, timesteps, encoder_hidden_states, **model_kwargs)
    err = (pred.float() - target.float()) ** 2
    return DenoisingStats(mse=err.mean(dim=tuple(range(1, err.dim()))))


def pair_noise(
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    num_train_timesteps: int,
    generator: torch.Generator | None = None,
    scheduler: Any = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(latents [2E], noise [2E], timesteps [2E]) in row order [w_1..w_E, l_1..l_E]; the winner and
    the loser of a pair share ε and t (Diffusion-DPO; as the official scripts). With a flow-matching
    `scheduler` t is drawn by `draw_timesteps` (SD3's logit-normal σ), else uniform in [0, T)."""
    if latents_w.shape != latents_l.shape:
        raise ConfigError(
            f"chosen latents {tuple(latents_w.shape)} and rejected latents {tuple(latents_l.shape)} "
            "differ in shape"
        )
    e = latents_w.shape[0]
    noise = torch.randn(latents_w.shape, generator=generator, dtype=latents_w.dtype)
    if scheduler is not None and prediction_type_of(scheduler) == "flow":
        t = draw_timesteps(scheduler, e, generator, "flow")
    else:
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
