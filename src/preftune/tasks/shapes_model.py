"""The shapes task's model: a tiny Stable-Diffusion-style pipeline trained from scratch, and sampling.

`pretrain(folder)` trains the tiny pipeline of `preftune.diffusion.tiny` on rendered images of the
task: first its VAE (reconstruction + a small KL term), then its UNet and text encoder together on
the v-prediction loss (Salimans & Ho 2022, §4: target v = α_t ε − σ_t x_0) over the VAE's latents,
and saves a `StableDiffusionPipeline` folder. `sample(folder, prompts, seeds)` draws images with DDIM.

Why v and not ε (Ho et al. 2020, Eq. 14): at high noise the ε target is almost x_t / σ_t whatever the
image, so the ε loss hardly depends on where the square is and the place is never learnt (measured:
with ε-prediction, swapping the prompt's place changed the denoising mse by < 0.001 at every t and
samples put the square in a random quadrant). The v target tends to −x_0 there, so the layout the
prompt names is what the model must predict.

Pretraining has a place check, as the arithmetic SFT has its accuracy target: after `unet_steps`
the pipeline draws one image per prompt and seed from `check_seeds` seeds that no later stage
samples with, and if fewer than `target_place` of them put the named colour in the named quadrant,
the UNet and text encoder are trained again from their initial weights and random state for
`max_unet_steps` — the same model `PretrainConfig(unet_steps=max_unet_steps)` gives (tested).
Measured on the quickstart's seeds 0 / 1 / 2: 100 % / 100 % / 56 % after 500 steps; seed 2's second
training places 97 % of its held-out squares (docs/diffusion.md, "Quickstart").
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from preftune.errors import ConfigError
from preftune.tasks.shapes import ShapePrompt, all_prompts, place_accuracy, render

MAX_PROMPT_TOKENS = 28  # "yellow square bottom right" is 26 characters, + start and end marks


@dataclass
class PretrainConfig:
    vae_steps: int = 300
    unet_steps: int = 500
    batch_size: int = 32
    lr: float = 2e-3
    vae_lr: float = 5e-3
    kl_weight: float = 1e-6
    prediction_type: str = "v_prediction"  # or "epsilon" (module docstring: why v), or "flow"
    levels: int = 3  # UNet resolutions: 8×8, 4×4, 2×2 latents — at 2×2 each position is one quadrant
    target_place: float | None = 0.9  # the place check (module docstring); None: no check
    max_unet_steps: int = 1000  # the place check's second training (no check when ≤ unet_steps)
    check_seeds: int = 4  # samples per prompt of the place check (DDIM, 20 steps)


# the place check's noise seeds start here (the quickstart's pairs: 10_000 s + i; held-out: 1_000_000 + ...)
CHECK_SEED = 3_000_000


def task_batch(rng: np.random.Generator, size: int) -> tuple[list[ShapePrompt], torch.Tensor]:
    prompts = all_prompts()
    chosen = [prompts[int(i)] for i in rng.integers(0, len(prompts), size)]
    return chosen, torch.from_numpy(np.stack([render(p, rng) for p in chosen]))


def train_vae(vae: Any, cfg: PretrainConfig, rng: np.random.Generator, log: Callable[[str], None]) -> None:
    """Fit the VAE to the task's images; then set scaling_factor = 1 / std of the latent means."""
    optimizer = torch.optim.Adam(vae.parameters(), lr=cfg.vae_lr)
    for step in range(cfg.vae_steps):
        _, images = task_batch(rng, cfg.batch_size)
        posterior = vae.encode(images).latent_dist
        recon = vae.decode(posterior.sample()).sample
        loss = torch.nn.functional.mse_loss(recon, images) + cfg.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if (step + 1) % max(1, cfg.vae_steps // 4) == 0:
            log(f"      vae step {step + 1}/{cfg.vae_steps}: loss {float(loss.detach()):.4f}")
    with torch.no_grad():
        _, images = task_batch(rng, 256)
        std = float(vae.encode(images).latent_dist.mean.std())
    vae.register_to_config(scaling_factor=1.0 / std)
    vae.requires_grad_(False).eval()


def train_denoiser(
    parts: dict[str, Any], cfg: PretrainConfig, rng: np.random.Generator, log: Callable[[str], None]
) -> None:
    """UNet and text encoder together on the ε-prediction loss over the VAE's (scaled) latents."""
    unet, text_encoder, tokenizer, vae = (
        parts["unet"],
        parts["text_encoder"],
        parts["tokenizer"],
        parts["vae"],
    )
    scheduler = parts["scheduler"]
    params = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0)
    total = cfg.unet_steps
    lr_at = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / total)
    )
    for step in range(total):
        prompts, images = task_batch(rng, cfg.batch_size)
        with torch.no_grad():
            latents = vae.encode(images).latent_dist.mean * vae.config.scaling_factor
        with torch.enable_grad():
            text = _encode_with_grad(tokenizer, text_encoder, [p.text for p in prompts])
        noise = torch.randn_like(latents)
        pred, target = _prediction_and_target(unet, scheduler, latents, noise, text)
        loss = torch.nn.functional.mse_loss(pred, target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        lr_at.step()
        if (step + 1) % max(1, total // 5) == 0:
            log(f"      unet step {step + 1}/{total}: loss {float(loss.detach()):.4f}")


def _prediction_and_target(
    unet: Any, scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, text: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The denoiser's output and its target: ε or v (DDPM forward noise), or for a flow-matching
    scheduler the velocity ε − x_0 at x_s = (1 − s) x_0 + s ε, s ~ U(0, 1), timestep 1000 s
    (rectified flow, Liu et al. 2023; as SD3's training)."""
    if "FlowMatch" in type(scheduler).__name__:
        s = torch.rand(latents.shape[0])
        sb = s.view(-1, 1, 1, 1)
        steps = s * scheduler.config.num_train_timesteps
        return unet(
            (1 - sb) * latents + sb * noise, steps, encoder_hidden_states=text
        ).sample, noise - latents
    t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],))
    pred = unet(scheduler.add_noise(latents, noise, t), t, encoder_hidden_states=text).sample
    kind = scheduler.config.prediction_type
    return pred, noise if kind == "epsilon" else scheduler.get_velocity(latents, noise, t)


def _encode_with_grad(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    return text_encoder(ids)[0]  # type: ignore[no-any-return]


def task_unet(seed: int, levels: int = 3) -> Any:
    """The tiny UNet with the caption also pooled into the time embedding (`addition_embed_type="text"`),
    so that colour and place condition every block, not only the cross-attention ones; `levels`
    resolutions (2: 8×8 and 4×4 latents; 3 adds 2×2, where zero padding tells each position its
    quadrant), cross-attention on all but the lowest."""
    from diffusers import UNet2DConditionModel

    from preftune.diffusion.tiny import LATENT_CHANNELS, TEXT_DIM

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(16, 32, 32)[:levels],
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=4,
        norm_num_groups=8,
        addition_embed_type="text",
        addition_embed_type_num_heads=2,
    )


def pretrain(
    folder: str | Path,
    *,
    seed: int = 0,
    config: PretrainConfig | None = None,
    log: Callable[[str], None] = print,
) -> Path:
    """Train the tiny pipeline on the task from scratch and save it as a StableDiffusionPipeline folder."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    from preftune.diffusion.tiny import tiny_components

    cfg = config or PretrainConfig()
    if cfg.prediction_type not in ("epsilon", "v_prediction", "flow") or cfg.levels not in (2, 3):
        raise ConfigError(
            f"pretrain: prediction_type {cfg.prediction_type!r} / levels {cfg.levels} — use epsilon, "
            "v_prediction or flow, and 2 or 3 levels"
        )
    rng = np.random.default_rng(seed)
    parts = tiny_components(seed, max_tokens=MAX_PROMPT_TOKENS)
    parts["unet"] = task_unet(seed, cfg.levels)
    if cfg.prediction_type == "flow":  # a rectified-flow pipeline (what preftune train awm trains)
        parts["scheduler"] = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000)
    else:
        parts["scheduler"] = DDPMScheduler.from_config(
            parts["scheduler"].config, prediction_type=cfg.prediction_type
        )
    train_vae(parts["vae"], cfg, rng, log)
    # the place check's target; none for a flow pipeline (the check samples with DDIM) or no longer training
    target = (
        cfg.target_place if cfg.prediction_type != "flow" and cfg.max_unet_steps > cfg.unet_steps else None
    )
    start = _denoiser_state(parts, rng) if target is not None else {}  # only the check trains it again
    train_denoiser(parts, cfg, rng, log)
    _save(parts, folder)
    if target is None:
        return Path(folder)
    placed = place_check(folder, seed, cfg.check_seeds)
    log(f"      place check: {placed:.0%} of the squares in the named quadrant (target {target:.0%})")
    if placed < target:
        log(f"      training the denoiser again from its start with {cfg.max_unet_steps} steps")
        rng = _restore_denoiser_state(parts, start)
        train_denoiser(parts, replace(cfg, unet_steps=cfg.max_unet_steps), rng, log)
        _save(parts, folder)
    return Path(folder)


def _save(parts: dict[str, Any], folder: str | Path) -> None:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(folder))  # type: ignore[attr-defined]


def _denoiser_state(parts: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
    """What the denoiser's training starts from: UNet and text-encoder weights and both random states."""
    return {
        "unet": copy.deepcopy(parts["unet"].state_dict()),
        "text_encoder": copy.deepcopy(parts["text_encoder"].state_dict()),
        "rng": copy.deepcopy(rng),
        "torch": torch.get_rng_state(),
    }


def _restore_denoiser_state(parts: dict[str, Any], state: dict[str, Any]) -> np.random.Generator:
    parts["unet"].load_state_dict(state["unet"])
    parts["text_encoder"].load_state_dict(state["text_encoder"])
    torch.set_rng_state(state["torch"])
    return copy.deepcopy(state["rng"])  # type: ignore[no-any-return]


def place_check(folder: str | Path, seed: int, seeds_per_prompt: int) -> float:
    """Share of `seeds_per_prompt` DDIM samples per prompt (noise seeds from `CHECK_SEED`) that put the
    named colour in the named quadrant (`shapes.place_accuracy`)."""
    prompts = all_prompts() * seeds_per_prompt
    seeds = [CHECK_SEED + seed * 10_000 + i for i in range(len(prompts))]
    with torch.random.fork_rng(devices=[]):  # the caller's random state is left as it was
        return float(place_accuracy(sample(folder, prompts, seeds), prompts).mean())


@torch.no_grad()
def sample(
    folder: str | Path,
    prompts: Sequence[ShapePrompt],
    seeds: Sequence[int],
    *,
    steps: int = 20,
    batch: int = 64,
) -> torch.Tensor:
    """[N, 3, 16, 16] images in [−1, 1], one per (prompt, seed), by DDIM (η = 0) in `steps` steps."""
    from diffusers import DDIMScheduler, StableDiffusionPipeline
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()
    pipe = StableDiffusionPipeline.from_pretrained(
        str(folder), safety_checker=None, requires_safety_checker=False
    )
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = list(prompts[i : i + batch])
        generators = [torch.Generator().manual_seed(int(s)) for s in seeds[i : i + batch]]
        images = pipe(
            [p.text for p in chunk],
            num_inference_steps=steps,
            guidance_scale=1.0,
            height=16,
            width=16,
            generator=generators,
            output_type="pt",
        ).images
        out.append(images * 2.0 - 1.0)
    return torch.cat(out)
