"""`preftune sweep --task diffusion`: the diffusion quickstart's model and pairs as a sweep's task.

`diffusion_sweep_task(folder, seed=...)` runs the quickstart's first three stages once into `folder`
(pretrained pipeline, reward-ranked pairs, held-out reward of the pretrained model; recorded in
`folder/task.json` and reused while the seed and recipe match) and returns the training values every
method shares (the quickstart's schedule; each loss keeps its paper's hyper-parameters) and a
`SweepTask` whose score is the held-out mean reward of a run's final pipeline on the same 256
samples (prompt × seed) as the quickstart's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError
from preftune.eval.sweep import SweepTask
from preftune.tasks.diffusion_quickstart import (
    DiffusionQuickstartConfig,
    heldout,
    mean_se,
    sample_pairs,
)
from preftune.tasks.shapes import BEST_REWARD, all_prompts
from preftune.tasks.shapes_model import pretrain


def _prepare(
    folder: Path, seed: int, cfg: DiffusionQuickstartConfig, log: Callable[[str], None]
) -> dict[str, Any]:
    recipe = {"seed": seed, "config": asdict(cfg)}
    path = folder / "task.json"
    if path.is_file():
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        if manifest.get("recipe") == json.loads(json.dumps(recipe)):
            log(f"sweep: reusing the diffusion task in {folder}")
            return manifest
        raise ConfigError(
            f"sweep: {folder} holds a diffusion task of another seed or recipe — pass another --task-dir"
        )
    log("sweep: preparing the diffusion task (pretrain, reward-ranked pairs, held-out reward)")
    base = pretrain(folder / "pretrained", seed=seed, config=cfg.pretrain, log=log)
    data, n_pairs = sample_pairs(base, folder / "data", cfg, seed, log)
    mean, se = mean_se(heldout(base, cfg, seed)[2])
    manifest = {
        "recipe": recipe, "model": str(base), "data": str(data), "pairs": n_pairs,
        "reward_before": mean, "reward_before_se": se,
    }  # fmt: skip
    path.write_text(json.dumps(manifest, indent=1), encoding="utf-8")
    return manifest


def diffusion_sweep_task(
    folder: Path,
    *,
    seed: int,
    config: DiffusionQuickstartConfig | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, Any], SweepTask]:
    """(config values, SweepTask) of the built-in diffusion task (module docstring); `config` (default:
    the quickstart's) sets the recipe."""
    import torch

    cfg = config or DiffusionQuickstartConfig()
    torch.set_num_threads(cfg.threads)
    manifest = _prepare(folder, seed, cfg, log)

    def mean_reward(final_dir: Path) -> float:
        return float(heldout(final_dir, cfg, seed)[2].mean())

    values = {
        "model": manifest["model"], "data": manifest["data"], "max_steps": cfg.max_steps,
        "batch_size": cfg.batch_size, "lr": cfg.lr, "seed": seed, "scheduler": "constant",
        "warmup_ratio": 0.0,
    }  # fmt: skip
    held = cfg.heldout_seeds * len(all_prompts())
    task = SweepTask(
        prompts=[],
        accuracy=mean_reward,
        baseline_accuracy=float(manifest["reward_before"]),
        name=f"{held} held-out samples of the shapes task ({len(all_prompts())} prompts × {cfg.heldout_seeds} seeds; "
        f"a true image scores {BEST_REWARD:.4f})",
        metric="mean reward",
    )
    return values, task
