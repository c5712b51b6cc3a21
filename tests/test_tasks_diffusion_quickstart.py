"""The diffusion quickstart: the shapes task's reward, and the pipeline end to end at toy sizes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.tasks.shapes import BEST_REWARD, ShapePrompt, all_prompts, render, reward

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_of_renders_black_and_misplaced_squares() -> None:
    rng = np.random.default_rng(0)
    prompts = all_prompts()
    images = torch.from_numpy(np.stack([render(p, rng) for p in prompts]))
    assert torch.allclose(reward(images, prompts), torch.full((16,), BEST_REWARD))  # 36/64 = 0.5625
    black = -torch.ones(1, 3, 16, 16)
    assert float(reward(black, [prompts[0]])[0]) == 0.0
    red_tl = ShapePrompt("red", "top left")
    moved = torch.from_numpy(render(ShapePrompt("red", "bottom right"), rng))[None]
    assert float(reward(moved, [red_tl])[0]) == pytest.approx(-36 / 192)  # colour right, place wrong
    blue = torch.from_numpy(render(ShapePrompt("blue", "top left"), rng))[None]
    assert float(reward(blue, [red_tl])[0]) == 0.0  # place right, colour wrong (distance 2√2 > 2)


def test_quickstart_pipeline_at_toy_size(tmp_path: Path) -> None:
    """Every stage runs and writes what it promises: pairs as image data, both grids (one row per
    prompt), summary.json with the paired gain and its standard error, report.html with the grids."""
    from preftune.tasks.diffusion_quickstart import DiffusionQuickstartConfig, run_diffusion_quickstart
    from preftune.tasks.shapes_model import PretrainConfig

    cfg = DiffusionQuickstartConfig(
        pretrain=PretrainConfig(vae_steps=2, unet_steps=2, batch_size=4), samples_per_prompt=2,
        pairs_per_prompt=1, min_gap=-1.0, heldout_seeds=2, sample_steps=2, max_steps=1, batch_size=4,
    )  # fmt: skip
    summary = run_diffusion_quickstart(tmp_path / "qs", config=cfg, log=lambda _: None, progress=False)
    out = tmp_path / "qs"
    rows = [json.loads(line) for line in (out / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["prompt"] for r in rows} == {p.text for p in all_prompts()}
    assert summary["heldout_samples"] == 32 and summary["pairs"] == 16 and summary["steps"] == 1
    gain = summary["reward_after"] - summary["reward_before"]
    assert summary["reward_gain"] == pytest.approx(gain, abs=1e-6)
    from PIL import Image

    grid = Image.open(out / "samples_after.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 16 * (64 + 2))  # 2 seeds × 16 prompts, 4× enlarged
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 2 and "samples before" in html


@pytest.mark.slow
@pytest.mark.xfail(
    reason="target not met yet: the tiny UNet learns the colours, not the places (docs/diffusion.md)"
)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quickstart_raises_heldout_reward_by_3_standard_errors(tmp_path: Path, seed: int) -> None:
    """The target: held-out mean reward rises by more than 3 standard errors of the paired gain."""
    from preftune.tasks.diffusion_quickstart import run_diffusion_quickstart

    summary = run_diffusion_quickstart(tmp_path / "qs", seed=seed, log=print, progress=False)
    assert summary["reward_gain"] > 3 * summary["reward_gain_se"] > 0
