"""What sampling from a pipeline folder needs besides the denoiser: prompts, text embeddings, the
VAE decode, the sampler of the pipeline's kind, and a reward of latents.

`Pipeline.load(folder)` holds the frozen VAE, the caption encoder the offline runs use
(`encode.caption_encoder`: UNet pipelines and SD3-style ones) and the training scheduler (DDPM on the
pipeline's schedule, or flow matching); `read_prompts(source)`
reads a prompt file (JSONL / JSON / Parquet / CSV with a 'prompt' column, or a .txt file, one prompt
a line) with `PATH:ROW: field` errors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.data.rows import Problem
from preftune.diffusion.image_rewards import ImageReward
from preftune.errors import DataError

_FIX = "give each row a 'prompt' with the text of an image prompt"


def read_prompts(source: str, split: str | None = None) -> list[str]:
    """The prompt texts of `source`; DataError listing every bad row (`PATH:ROW: field 'prompt'`)."""
    from preftune.rl.prompts import checked_prompt_rows

    path = Path(source)
    if path.suffix == ".txt":
        if not path.is_file():
            raise DataError(
                "file does not exist", path=source, fix="pass an existing prompt file to --prompts"
            )
        lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
        texts = [line for line in lines if line]
        if not texts:
            raise DataError("no prompts", path=source, fix="write one prompt a line")
        return texts
    _, rows = checked_prompt_rows(source, _text_problem, _FIX, split=split)
    return [rec["prompt"] for _, rec in rows]


def _text_problem(rec: dict[str, Any], row: int, path: str) -> Problem | None:
    prompt = rec.get("prompt")
    if isinstance(prompt, str) and prompt.strip():
        return None
    what = "missing" if prompt is None else "empty text" if isinstance(prompt, str) else "not text"
    return Problem(what, row=row, field="prompt", fix=_FIX, path=path)


@dataclass
class Pipeline:
    """The frozen parts of a pipeline folder: its VAE, its caption encoder (`encode.caption_encoder`:
    a UNet pipeline's text encoder, or an SD3-style pipeline's `encode_prompt`, packed) and its
    training scheduler (DDPM on its schedule, or flow matching)."""

    folder: str
    vae: Any
    encoder: Callable[[list[str]], torch.Tensor]
    scheduler: Any

    @classmethod
    def load(cls, folder: str | Path) -> Pipeline:
        from preftune.diffusion.denoiser import training_scheduler
        from preftune.diffusion.encode import caption_encoder, load_vae

        return cls(str(folder), load_vae(folder), caption_encoder(folder), training_scheduler(folder))

    @property
    def is_flow(self) -> bool:
        return "FlowMatch" in type(self.scheduler).__name__

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[N, L, D] conditioning of the prompts, as the offline runs cache it (no gradient)."""
        with torch.no_grad():
            return self.encoder(list(prompts))

    @property
    def text_dim(self) -> int:
        """D, the width of the conditioning (what a critic's text projection reads)."""
        return int(self.encode([""]).shape[-1])

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """[N, 3, H, W] images in [0, 1] of latents (differentiable: ReNO's gradient goes through)."""
        shift = getattr(self.vae.config, "shift_factor", None) or 0.0
        x = latents / self.vae.config.scaling_factor + shift
        return ((self.vae.decode(x.to(self.vae.dtype)).sample.float() + 1.0) / 2.0).clamp(0.0, 1.0)

    def latent_reward(self, reward: ImageReward, prompts: Sequence[str]) -> Any:
        """reward_fn(latents [N, …]) → [N] of the decoded images for `prompts` (the RL steps' form)."""

        def reward_fn(latents: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return reward(self.decode(latents), prompts).detach()

        return reward_fn


def latent_shape(unet: Any) -> tuple[int, int, int]:
    """(C, h, w) of the denoiser's latents."""
    config = unet.config
    size = config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return int(config.in_channels), int(h), int(w)
