"""Rewards of generated images: a built-in name or a user's `module:function`.

    fn(images, prompts) -> list[float] | tensor [N]

`images` is a float tensor [N, 3, H, W] with values in [0, 1] (diffusers' `output_type="pt"`),
`prompts` the N prompt texts. A reward that returns a tensor computed from `images` is
differentiable, which ReNO (`preftune sample --reno`) needs; the RL methods only read its values.

Built-in: `shapes`, the built-in task's reward (`preftune.tasks.shapes.reward`: the named colour in
the named quadrant, up to 36/64 ≈ 0.56; prompts such as "red square top left").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from preftune.errors import ConfigError, PreftuneError

ImageRewardFn = Callable[[torch.Tensor, list[str]], Any]


def shapes_reward(images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
    """The shapes task's reward of images in [0, 1] for their prompts (differentiable)."""
    from preftune.tasks.shapes import parse_prompt, reward

    parsed = []
    for text in prompts:
        try:
            parsed.append(parse_prompt(text))
        except ValueError:
            raise ConfigError(
                f"reward 'shapes': the prompt {text!r} is not a prompt of the built-in task — use prompts "
                "such as 'red square top left' (colours red/green/blue/yellow; places top left, top right, "
                "bottom left, bottom right), or another --reward"
            ) from None
    return reward(images * 2.0 - 1.0, parsed)


IMAGE_REWARDS: dict[str, ImageRewardFn] = {"shapes": shapes_reward}


@dataclass
class ImageReward:
    """A named image reward; `reward(images, prompts)` → float tensor [N] (gradient kept when the
    function returns a tensor that has one)."""

    name: str
    fn: ImageRewardFn

    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        n = images.shape[0]
        try:
            out = self.fn(images, list(prompts))
        except PreftuneError:
            raise
        except Exception as e:  # a user's function failed: say which one
            raise ConfigError(f"reward '{self.name}' raised {type(e).__name__}: {e}") from e
        if isinstance(out, torch.Tensor):
            values = out.reshape(-1).float()
        elif isinstance(out, Sequence) and not isinstance(out, str):
            values = torch.tensor([_number(self.name, v, i) for i, v in enumerate(out)], dtype=torch.float32)
        else:
            raise ConfigError(
                f"reward '{self.name}' returned {type(out).__name__}; return a list of {n} floats"
            )
        if values.numel() != n:
            raise ConfigError(
                f"reward '{self.name}' returned {values.numel()} values for {n} images; return one per image"
            )
        if not bool(torch.isfinite(values.detach()).all()):
            raise ConfigError(f"reward '{self.name}' returned a non-finite value; rewards must be finite")
        return values


def _number(name: str, value: Any, i: int) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(float(value)):
        raise ConfigError(f"reward '{name}' returned {value!r} for image {i}; rewards must be finite numbers")
    return float(value)


def load_image_reward(spec: str | ImageRewardFn | None) -> ImageReward:
    """A built-in name (`shapes`), `module:function` / `file.py:function`, or a callable."""
    from preftune.reward.registry import _import_callable

    if spec is None or (isinstance(spec, str) and not spec.strip()):
        raise ConfigError(
            "--reward is required: a built-in image reward (" + ", ".join(IMAGE_REWARDS) + ") or "
            "'module:function' taking (images [N, 3, H, W] in [0, 1], prompts) and returning N floats"
        )
    if callable(spec):
        return ImageReward(getattr(spec, "__name__", "reward"), spec)
    name = spec.strip()
    if name in IMAGE_REWARDS:
        return ImageReward(name, IMAGE_REWARDS[name])
    if ":" in name:
        return ImageReward(name, _import_callable(name))
    raise ConfigError(
        f"--reward '{name}': unknown image reward (built-in: {', '.join(IMAGE_REWARDS)}; or a Python "
        "function 'module:function' / 'file.py:function' taking (images, prompts))"
    )
