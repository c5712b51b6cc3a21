"""A verifiable text-to-image task: a coloured square at a named place, with a computable reward.

Prompts name one of 4 colours and one of 4 places, e.g. "red square top left". An image
of the prompt (16×16 pixels, RGB in [−1, 1]) is a black background with a 6×6 square of that colour
in that quadrant (jittered by up to one pixel). The reward of an image for a prompt is

    r = mean_{pixels in the named quadrant} s(x) − mean_{pixels elsewhere} s(x),
    s(x) = clip(1 − ‖x − c‖₂ / 2, 0, 1),   c the named colour,

so the colour in the right place scores up to 36/64 ≈ 0.56, the right colour in a wrong place
scores below zero, and a black image 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SIZE = 16
SQUARE = 6
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (1.0, -1.0, -1.0),
    "green": (-1.0, 1.0, -1.0),
    "blue": (-1.0, -1.0, 1.0),
    "yellow": (1.0, 1.0, -1.0),
}
PLACES: dict[str, tuple[int, int]] = {  # (row, column) of the quadrant
    "top left": (0, 0),
    "top right": (0, 1),
    "bottom left": (1, 0),
    "bottom right": (1, 1),
}
BEST_REWARD = SQUARE * SQUARE / (SIZE // 2) ** 2


@dataclass(frozen=True)
class ShapePrompt:
    colour: str
    place: str

    @property
    def text(self) -> str:
        return f"{self.colour} square {self.place}"


def all_prompts() -> list[ShapePrompt]:
    return [ShapePrompt(c, p) for c in COLOURS for p in PLACES]


def parse_prompt(text: str) -> ShapePrompt:
    for prompt in all_prompts():
        if prompt.text == text:
            return prompt
    raise ValueError(f"not a prompt of the shapes task: {text!r}")


def render(prompt: ShapePrompt, rng: np.random.Generator) -> np.ndarray:
    """[3, SIZE, SIZE] float32 image of the prompt in [−1, 1]."""
    image = -np.ones((3, SIZE, SIZE), dtype=np.float32)
    half = SIZE // 2
    row, col = PLACES[prompt.place]
    top = row * half + (half - SQUARE) // 2 + int(rng.integers(-1, 2))
    left = col * half + (half - SQUARE) // 2 + int(rng.integers(-1, 2))
    image[:, top : top + SQUARE, left : left + SQUARE] = np.array(COLOURS[prompt.colour], dtype=np.float32)[
        :, None, None
    ]
    return image


def reward(images: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """[N] rewards of [N, 3, SIZE, SIZE] images in [−1, 1] for their prompts (module docstring)."""
    half = SIZE // 2
    out = []
    for image, prompt in zip(images.float(), prompts):
        colour = torch.tensor(COLOURS[prompt.colour]).view(3, 1, 1)
        close = (1.0 - (image - colour).norm(dim=0) / 2.0).clamp(0.0, 1.0)
        row, col = PLACES[prompt.place]
        inside = torch.zeros(SIZE, SIZE, dtype=torch.bool)
        inside[row * half : (row + 1) * half, col * half : (col + 1) * half] = True
        out.append(close[inside].mean() - close[~inside].mean())
    return torch.stack(out)


def place_accuracy(images: torch.Tensor, prompts: list[ShapePrompt]) -> torch.Tensor:
    """[N] 1.0 where the named quadrant is strictly the closest to the named colour (mean s(x) per
    quadrant, module docstring), else 0.0 (ties, e.g. a black image, count as misses): whether the
    image puts the prompt's colour in the prompt's place."""
    half = SIZE // 2
    out = []
    for image, prompt in zip(images.float(), prompts):
        colour = torch.tensor(COLOURS[prompt.colour]).view(3, 1, 1)
        close = (1.0 - (image - colour).norm(dim=0) / 2.0).clamp(0.0, 1.0)
        quadrants = close.view(2, half, 2, half).mean(dim=(1, 3)).flatten()  # row-major quadrants
        row, col = PLACES[prompt.place]
        named = quadrants[row * 2 + col]
        others = torch.cat([quadrants[: row * 2 + col], quadrants[row * 2 + col + 1 :]])
        out.append(float(bool(named > others.max())))
    return torch.tensor(out)


def to_png(image: torch.Tensor) -> bytes:
    """PNG bytes of a [3, H, W] image in [−1, 1]."""
    import io

    from PIL import Image

    pixels = ((image.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def grid_png(images: torch.Tensor, columns: int, scale: int = 4, gap: int = 2) -> bytes:
    """PNG of [N, 3, H, W] images in [−1, 1] laid out in `columns`, each enlarged `scale`×, grey gaps."""
    n, _, h, w = images.shape
    rows = -(-n // columns)
    big = images.repeat_interleave(scale, dim=2).repeat_interleave(scale, dim=3)
    hh, ww = h * scale, w * scale
    canvas = torch.zeros(3, rows * (hh + gap) + gap, columns * (ww + gap) + gap)
    for i in range(n):
        r, c = divmod(i, columns)
        y, x = gap + r * (hh + gap), gap + c * (ww + gap)
        canvas[:, y : y + hh, x : x + ww] = big[i]
    return to_png(canvas)
