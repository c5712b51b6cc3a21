"""What sampling from a pipeline folder needs besides the denoiser: prompts, text embeddings, the
VAE decode, the sampler of the pipeline's kind, and a reward of latents.

`Pipeline.load(folder)` holds the frozen VAE, tokenizer and text encoder (`encode.load_encoders`) and
the training scheduler (DDPM on the pipeline's schedule, or flow matching); `read_prompts(source)`
reads a prompt file (JSONL / JSON / Parquet / CSV with a 'prompt' column, or a .txt file, one prompt
a line) with `PATH:ROW: field` errors.
"""

from __future__ import annotations

from collections.abc import Sequence
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
    """The frozen parts of a pipeline folder (VAE, tokenizer, text encoder) and its scheduler."""

    folder: str
    vae: Any
    tokenizer: Any
    text_encoder: Any
    scheduler: Any

    @classmethod
    def load(cls, folder: str | Path) -> Pipeline:
        from preftune.diffusion.denoiser import training_scheduler
        from preftune.diffusion.encode import load_encoders

        vae, tokenizer, text_encoder = load_encoders(folder)
        return cls(str(folder), vae, tokenizer, text_encoder, training_scheduler(folder))

    @property
    def is_flow(self) -> bool:
        return "FlowMatch" in type(self.scheduler).__name__

    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """[N, L, D] text embeddings (no gradient)."""
        from preftune.diffusion.tiny import encode_prompts

        return encode_prompts(self.tokenizer, self.text_encoder, list(prompts))

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
