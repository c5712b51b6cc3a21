"""`preftune sweep --task diffusion`: the diffusion quickstart's model and pairs as a sweep's task.

`diffusion_sweep_task(folder, seed=...)` runs the quickstart's first three stages once into `folder`
(pretrained pipeline, reward-ranked pairs, held-out reward of the pretrained model; recorded in
`folder/task.json` and reused while the seed and recipe match) and returns the training values every
method shares (the quickstart's schedule; each loss keeps its paper's hyper-parameters) and a
`SweepTask` whose score is the held-out mean reward of a run's final pipeline on the same 256
samples (prompt × seed) as the quickstart's. The training data is `scored_pairs`' copy of the pairs,
which adds each image's standardised reward as `chosen_score` / `rejected_score`: SmPO reads them as
its smoothed label; every other loss ignores them.
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

TRAINING_FIELDS = ("max_steps", "batch_size", "lr", "beta")


def _preparation(config: dict[str, Any]) -> dict[str, Any]:
    """The recipe values a prepared folder depends on: all but the training stage's schedule (the
    sweep's values, `TRAINING_FIELDS`)."""
    return {k: v for k, v in config.items() if k not in TRAINING_FIELDS}


def _prepare(
    folder: Path, seed: int, cfg: DiffusionQuickstartConfig, log: Callable[[str], None]
) -> dict[str, Any]:
    recipe = {"seed": seed, "config": _preparation(asdict(cfg))}
    path = folder / "task.json"
    if path.is_file():
        manifest: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
        held = manifest.get("recipe") or {}
        # a folder of earlier code also recorded the schedule in its recipe
        if {**held, "config": _preparation(held.get("config", {}))} == json.loads(json.dumps(recipe)):
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


def _pair_images(data: Path) -> tuple[list[dict[str, Any]], list[Any], Any, Any]:
    """(rows, prompts, chosen images, rejected images [N, 3, R, R] in [−1, 1]) of a pairs file of the task."""
    import numpy as np
    import torch
    from PIL import Image

    from preftune.tasks.shapes import parse_prompt

    rows = [json.loads(line) for line in data.read_text(encoding="utf-8").splitlines()]

    def image(name: str) -> torch.Tensor:
        pixels = np.asarray(Image.open(data.parent / name).convert("RGB"), dtype=np.float32)
        return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)

    prompts = [parse_prompt(r["prompt"]) for r in rows]
    chosen = torch.stack([image(r["chosen"]) for r in rows])
    return rows, prompts, chosen, torch.stack([image(r["rejected"]) for r in rows])


def scored_pairs(data: Path) -> Path:
    """data/../pairs_scored.jsonl: the pairs of `data` with SmPO's scores, each image's reward (read
    back from its PNG) divided by the std of all the pairs' rewards, so that p = σ(s_w − s_l) spreads
    over (½, 1) instead of sitting at ½ for rewards that differ by hundredths. Written once."""
    import torch

    from preftune.tasks.shapes import reward

    out = data.with_name("pairs_scored.jsonl")
    if out.is_file():
        return out
    rows, prompts, chosen_images, rejected_images = _pair_images(data)
    chosen, rejected = reward(chosen_images, prompts), reward(rejected_images, prompts)
    scale = float(torch.cat([chosen, rejected]).std())
    lines = [
        json.dumps({**r, "chosen_score": float(c) / scale, "rejected_score": float(s) / scale})
        for r, c, s in zip(rows, chosen, rejected)
    ]
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


def two_caption_pairs(data: Path) -> Path:
    """data/../pairs_two_captions.jsonl: DCPO's rows (`chosen_prompt`, `rejected_prompt`) for the task's
    pairs. The winner keeps its prompt; the loser's caption is the task prompt *other than the
    winner's* that the loser image matches best by the task's reward — a captioner that reads the
    image exactly and must name a different caption (Saeidi et al. 2025 caption each image with a
    vision-language model, DCPO-c, or perturb the prompt, DCPO-p). Written once."""
    from preftune.tasks.shapes import reward

    out = data.with_name("pairs_two_captions.jsonl")
    if out.is_file():
        return out
    rows, prompts, _, rejected = _pair_images(data)
    lines = []
    for row, prompt, image in zip(rows, prompts, rejected):
        others = [p for p in all_prompts() if p != prompt]
        scores = reward(image[None].expand(len(others), -1, -1, -1), others)
        caption = others[int(scores.argmax())].text
        pair = {k: v for k, v in row.items() if k != "prompt"}
        lines.append(json.dumps({"chosen_prompt": prompt.text, "rejected_prompt": caption, **pair}))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return out


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
        "model": manifest["model"], "data": str(scored_pairs(Path(manifest["data"]))),
        "max_steps": cfg.max_steps,
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
