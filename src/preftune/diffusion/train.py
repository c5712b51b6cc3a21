"""One optimisation step of an offline diffusion preference loss (Python API).

    loss = train_step(unet, ref_unet, optimizer, latents_w, latents_l, text_embeds, scheduler,
                      loss="dpo", generator=g)

Any registered pairwise loss of the zoo applies: the seam turns one denoising pass
per image into the "log-probs" it reads. β is in the papers' units (DIFFUSION_DEFAULTS).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from preftune import losses
from preftune.diffusion.seam import (
    DenoisingStats,
    branch_conditioning,
    denoising_stats,
    pair_batch,
    pair_noise,
)
from preftune.errors import ConfigError
from preftune.losses.registry import LossOutput

# Defaults of the zoo's language-model losses that differ on diffusion statistics (paper units):
# Diffusion-DPO β = 5000 (Wallace et al. 2023, SD 1.5); its hinge and IPO variants the same, as in the
# diffusers research script, whose one β_dpo = 2500 (the ½ folded in) serves all three loss types:
# its IPO branch, (−d − 1/(2β_dpo))² once it reads β_dpo (it reads an undefined `args.beta`), is
# 4 × ipo at β = 2β_dpo = 5000. The zoo's language default β = 0.1 would set IPO's target margin
# 1/(2β) = 5 in h = −d/2, three orders of magnitude beyond what per-element-mean statistics span.
DIFFUSION_DEFAULTS: dict[str, dict[str, Any]] = {
    "dpo": {"beta": 5000.0},
    "hinge": {"beta": 5000.0},
    "ipo": {"beta": 5000.0},
}


def with_paper_defaults(config: Any) -> Any:
    """`config` with DIFFUSION_DEFAULTS as TERM.KEY hyper-parameters when its model is a pipeline
    folder and neither KEY nor TERM.KEY is set (so config.yaml records the value used)."""
    from dataclasses import replace

    from preftune.method_checks import is_distill
    from preftune.online_methods import is_online
    from preftune.paths import is_pipeline_folder

    if not is_pipeline_folder(config.model) or is_online(config.method) or is_distill(config.method):
        return config  # (refused by check_model_kind)
    hparams = dict(config.hparams)
    for spec, _ in losses.parse_objective(config.method):
        for key, value in DIFFUSION_DEFAULTS.get(spec.name, {}).items():
            if key not in hparams and f"{spec.name}.{key}" not in hparams:
                hparams[f"{spec.name}.{key}"] = value
    return replace(config, hparams=hparams)


def pair_loss(
    unet: Any,
    reference: Any | None,
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    scheduler: Any,
    *,
    loss: str = "dpo",
    hparams: Mapping[str, Any] | None = None,
    labels: torch.Tensor | None = None,
    generator: torch.Generator | None = None,
) -> LossOutput:
    """The per-pair losses [E] of `loss` on E image pairs (one shared ε and t per pair).

    encoder_hidden_states: [E, L, D] one caption per pair, or [2E, L, D] winner then loser captions
    (DCPO). reference: a frozen denoiser, or None for reference-free losses (mapo). labels: the soft
    label p per pair for smooth_dpo / smpo.
    """
    spec = losses.get(loss)
    if spec.kind != "pairwise":
        raise ConfigError(f"loss '{loss}' trains on {spec.kind} data; pair_loss needs a pairwise loss")
    if spec.needs_reference and reference is None:
        raise ConfigError(f"loss '{loss}' needs a reference denoiser (reference=None)")
    pairs = latents_w.shape[0]
    total = int(scheduler.config.get("num_train_timesteps", 1000))
    latents, noise, t = pair_noise(latents_w, latents_l, total, generator, scheduler)
    cond = branch_conditioning(encoder_hidden_states, pairs)
    policy = denoising_stats(unet, latents, noise, t, cond, scheduler)
    ref: DenoisingStats | None = None
    if spec.needs_reference and reference is not None:
        with torch.no_grad():
            ref = denoising_stats(reference, latents, noise, t, cond, scheduler)
    hp = {**DIFFUSION_DEFAULTS.get(loss, {}), **dict(hparams or {})}
    return spec(pair_batch(policy, ref, labels), {}, **hp)


def train_step(
    unet: Any,
    reference: Any | None,
    optimizer: torch.optim.Optimizer,
    latents_w: torch.Tensor,
    latents_l: torch.Tensor,
    encoder_hidden_states: torch.Tensor,
    scheduler: Any,
    **kwargs: Any,
) -> float:
    """One optimiser step on the mean per-pair loss (`pair_loss`'s arguments); returns that loss."""
    out = pair_loss(unet, reference, latents_w, latents_l, encoder_hidden_states, scheduler, **kwargs)
    value = out.losses.mean()
    optimizer.zero_grad(set_to_none=True)
    value.backward()
    optimizer.step()
    return float(value.detach())
