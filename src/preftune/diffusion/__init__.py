"""Diffusion models: preference losses, samplers and solvers built on `diffusers` (docs/diffusion.md).

A denoising pass gives each image the implicit log-likelihood statistic −½·mse(prediction, target)
(`denoising_stats`); grouped into a `PreferenceBatch` (`pair_batch`, `unpaired_batch`) it is what
every registered loss reads, so Diffusion-DPO is the `dpo` loss with β in the paper's units.
"""

from preftune.diffusion.seam import (
    PREDICTION_TYPES,
    DenoisingStats,
    branch_conditioning,
    denoiser_output,
    denoising_stats,
    draw_timesteps,
    noisy_input_and_target,
    pack_conditioning,
    pair_batch,
    pair_noise,
    prediction_type_of,
    unpack_conditioning,
    unpaired_batch,
)
from preftune.diffusion.train import DIFFUSION_DEFAULTS, pair_loss, train_step

__all__ = [
    "DIFFUSION_DEFAULTS",
    "PREDICTION_TYPES",
    "DenoisingStats",
    "branch_conditioning",
    "denoiser_output",
    "denoising_stats",
    "draw_timesteps",
    "noisy_input_and_target",
    "pack_conditioning",
    "pair_batch",
    "pair_loss",
    "pair_noise",
    "prediction_type_of",
    "train_step",
    "unpack_conditioning",
    "unpaired_batch",
]
