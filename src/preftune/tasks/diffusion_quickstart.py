"""`preftune quickstart --task diffusion`: pretrain → sample → reward-ranked pairs → Diffusion-DPO → report.

1. pretrain the tiny text-to-image pipeline on the shapes task from scratch (`shapes_model.pretrain`)
2. sample `samples_per_prompt` images per prompt; score them with the task's reward; pair each
   prompt's best with its worst, second best with second worst, ... (gap > `min_gap`); the pairs
   are PNG files and a pairs.jsonl, ordinary image preference data
3. held-out reward of the pretrained model: fresh seeds, every prompt
4. `preftune.train.api.train` with METHOD (default dpo) on the pairs, from the pretrained folder
5. held-out reward of OUT/final/ on the same seeds; summary.json (means, standard errors, the
   paired difference and its standard error) and report.html with both sample grids
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.diffusion.online_run import mean_se
from preftune.errors import ConfigError
from preftune.tasks.shapes import (
    ShapePrompt,
    all_prompts,
    grid_png,
    place_accuracy,
    reward,
    to_png,
)
from preftune.tasks.shapes_model import PretrainConfig, pretrain, sample


@dataclass
class DiffusionQuickstartConfig:
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    samples_per_prompt: int = 32
    pairs_per_prompt: int = 16
    """Up to 16 pairs per prompt from 32 samples (~215 pairs; 16 and 8, ~105 pairs, until 3 December
    2026): with half as many pairs one seed of five fitted its 97 pairs to a loss of 0.001 and gained
    only 2.2 standard errors; with these every measured seed gains more than 3 (docs/diffusion.md,
    "Quickstart")."""
    min_gap: float = 0.01
    heldout_seeds: int = 16
    sample_steps: int = 20
    max_steps: int = 150
    batch_size: int = 16
    lr: float = 5e-5
    beta: float = 5000.0
    threads: int = 1


def reward_pairs(
    prompts: list[ShapePrompt],
    images: torch.Tensor,
    rewards: torch.Tensor,
    cfg: DiffusionQuickstartConfig,
) -> list[tuple[ShapePrompt, int, int]]:
    """(prompt, chosen index, rejected index): per prompt, i-th best vs i-th worst while the gap > min_gap."""
    pairs = []
    for prompt in dict.fromkeys(prompts):
        idx = [i for i, p in enumerate(prompts) if p == prompt]
        ranked = sorted(idx, key=lambda i: -float(rewards[i]))
        for k in range(min(cfg.pairs_per_prompt, len(ranked) // 2)):
            best, worst = ranked[k], ranked[-1 - k]
            if float(rewards[best] - rewards[worst]) > cfg.min_gap:
                pairs.append((prompt, best, worst))
    return pairs


def write_pairs(folder: Path, pairs: list[tuple[ShapePrompt, int, int]], images: torch.Tensor) -> Path:
    """folder/pairs.jsonl and folder/img/*.png (the chosen and rejected sample of each pair)."""
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for n, (prompt, best, worst) in enumerate(pairs):
        names = []
        for tag, i in (("chosen", best), ("rejected", worst)):
            name = f"img/{n}-{tag}.png"
            (folder / name).write_bytes(to_png(images[i]))
            names.append(name)
        rows.append({"prompt": prompt.text, "chosen": names[0], "rejected": names[1]})
    path = folder / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sample_pairs(
    base: Path,
    folder: Path,
    cfg: DiffusionQuickstartConfig,
    seed: int,
    log: Callable[[str], None],
) -> tuple[Path, int]:
    """Stage 2: `samples_per_prompt` samples per prompt from `base`, ranked by the reward into pairs
    (`reward_pairs`) written as image data under `folder`; (pairs.jsonl, number of pairs)."""
    prompts = all_prompts() * cfg.samples_per_prompt
    images = sample(
        base,
        prompts,
        [seed * 10_000 + i for i in range(len(prompts))],
        steps=cfg.sample_steps,
    )
    rewards = reward(images, prompts)
    pairs = reward_pairs(prompts, images, rewards, cfg)
    if not pairs:
        raise ConfigError("quickstart: no sample pair differs in reward by more than min_gap")
    log(f"      {len(pairs)} pairs, mean reward of the samples {float(rewards.mean()):.3f}")
    return write_pairs(folder, pairs, images), len(pairs)


def heldout(
    folder: Path, cfg: DiffusionQuickstartConfig, seed: int
) -> tuple[list[ShapePrompt], torch.Tensor, torch.Tensor]:
    """(prompts, images, rewards) of every prompt × `heldout_seeds` seeds no pair was sampled with."""
    prompts = all_prompts() * cfg.heldout_seeds
    seeds = [1_000_000 + seed * 10_000 + i for i in range(len(prompts))]
    images = sample(folder, prompts, seeds, steps=cfg.sample_steps)
    return prompts, images, reward(images, prompts)


# losses that read a reward score on each pair, which the quickstart's pairs do not carry (the
# diffusion sweep's `scored_pairs` adds them)
SCORED_LOSSES = {
    "smpo": "its smoothed label p = σ(s_w − s_l) reads chosen_score and rejected_score on each pair",
    "smooth_dpo": "it reads a soft label p on each pair (from chosen_score and rejected_score)",
}


def quickstart_losses() -> list[str]:
    """The losses `quickstart --task diffusion --method` accepts: those that train a denoiser
    (`method_checks.image_losses`) on pairs without reward scores."""
    from preftune.method_checks import image_losses

    return [name for name in image_losses() if name not in SCORED_LOSSES]


def check_diffusion_method(method: str) -> None:
    """The quickstart trains `method` on image pairs: an offline loss (or weighted sum) of the registry
    that trains a denoiser on unscored pairs; refused at once, before the pretraining, when it is not
    one — a misspelled name is matched against those losses only."""
    from preftune import losses
    from preftune.diffusion_methods import is_diffusion_rl
    from preftune.losses.registry import _did_you_mean
    from preftune.method_checks import image_loss_problem, image_loss_refusal, is_distill, online_counterpart
    from preftune.online_methods import is_online

    accepted = quickstart_losses()
    if is_online(method) or is_distill(method) or is_diffusion_rl(method) or method.strip() in ("rm", "prm"):
        raise ConfigError(
            f"quickstart --task diffusion trains an offline loss on image pairs ({', '.join(accepted)}), "
            f"not '{method}' — {online_counterpart(method) if is_online(method) else ''}the online "
            "diffusion methods (ddpo, dpok, d3po, spo, awm) run with preftune train on a pipeline folder "
            "(docs/diffusion.md)"
        )
    names = [part.partition(":")[0].strip() for part in method.split(",")]
    for name in names:
        spec = losses.REGISTRY.get(name)
        if spec is None and name:  # (an empty term: parse_objective names it)
            raise ConfigError(
                f"quickstart --task diffusion: unknown loss '{name}'{_did_you_mean(name, accepted)} (it "
                f"trains one of: {', '.join(accepted)}; or a weighted sum such as dpo:1,sft:0.1)"
            )
        if name in SCORED_LOSSES:
            raise ConfigError(
                f"quickstart --task diffusion: '{name}' cannot train here: {SCORED_LOSSES[name]}, which the "
                f"quickstart's pairs do not carry — run it with preftune sweep --task diffusion --methods "
                f"{name} (its pairs carry the rewards)"
            )
        why = image_loss_problem(spec, len(names) == 1) if spec is not None else ""
        if why:
            raise ConfigError(
                f"quickstart --task diffusion: '{name}' cannot train a diffusion pipeline: "
                + image_loss_refusal(name, why, accepted)
            )
    losses.parse_objective(method)  # weights, repeated terms, one data kind


def run_diffusion_quickstart(
    out_dir: str | Path,
    *,
    method: str = "dpo",
    seed: int = 0,
    config: DiffusionQuickstartConfig | None = None,
    log: Callable[[str], None] = print,
    progress: bool = True,
) -> dict[str, Any]:
    """The whole pipeline (module docstring); returns summary.json's content."""
    from preftune.config import TrainConfig
    from preftune.train.api import train

    cfg = config or DiffusionQuickstartConfig()
    out = Path(out_dir)
    if (out / "metrics.jsonl").exists():
        raise ConfigError(f"quickstart: {out} already holds a run — pass another --out or delete it")
    torch.set_num_threads(cfg.threads)
    start = time.perf_counter()
    log("[1/5] pretraining a tiny text-to-image pipeline on coloured squares (VAE, then UNet + text encoder)")
    base = pretrain(out / "pretrained", seed=seed, config=cfg.pretrain, log=log)
    log(f"[2/5] sampling {cfg.samples_per_prompt} images per prompt and ranking them by the reward")
    data, n_pairs = sample_pairs(base, out / "data", cfg, seed, log)
    log("[3/5] held-out reward of the pretrained model")
    held_prompts, before_images, before = heldout(base, cfg, seed)
    log(f"[4/5] training {method} on the pairs")
    hparams = {"beta": cfg.beta} if method in ("dpo", "hinge", "inpo") else {}
    result = train(
        TrainConfig(
            method=method, model=str(base), data=str(data), out=str(out), hparams=hparams,
            max_steps=cfg.max_steps, batch_size=cfg.batch_size, lr=cfg.lr, seed=seed,
            scheduler="constant", warmup_ratio=0.0, cache_dir=str(out / "cache"), progress=progress,
            report=False,
        )
    )  # fmt: skip
    log("[5/5] held-out reward of the trained model")
    _, after_images, after = heldout(result.final_dir, cfg, seed)
    summary = _summary(out, method, seed, cfg, before, after, n_pairs, result.steps, start)
    places = [float(place_accuracy(x, held_prompts).mean()) for x in (before_images, after_images)]
    summary.update(place_before=places[0], place_after=places[1])
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    grids = {
        "samples before (rows: prompts, columns: held-out seeds)": _grid(before_images, held_prompts),
        "samples after (same prompts and seeds)": _grid(after_images, held_prompts),
    }
    for name, png in zip(("samples_before.png", "samples_after.png"), grids.values()):
        (out / name).write_bytes(png)
    from preftune.eval.report import write_report

    write_report(
        out,
        extra={
            **grids,
            **{k: v for k, v in summary.items() if not isinstance(v, dict)},
        },
    )
    log(
        f"      held-out reward {summary['reward_before']:.3f} ± {summary['reward_before_se']:.3f} → "
        f"{summary['reward_after']:.3f} ± {summary['reward_after_se']:.3f} (paired gain "
        f"{summary['reward_gain']:.3f} = {summary['gain_in_se']:.1f} standard errors; {summary['seconds']:.0f}s); "
        f"squares in the named quadrant {places[0]:.0%} → {places[1]:.0%}"
    )
    return summary


def _grid(images: torch.Tensor, prompts: list[ShapePrompt]) -> bytes:
    """Prompt-major grid: one row per prompt, one column per held-out seed."""
    order = sorted(range(len(prompts)), key=lambda i: all_prompts().index(prompts[i]))
    return grid_png(images[order], columns=len(prompts) // len(all_prompts()))


def _summary(
    out: Path, method: str, seed: int, cfg: DiffusionQuickstartConfig, before: torch.Tensor,
    after: torch.Tensor, pairs: int, steps: int, start: float,
) -> dict[str, Any]:  # fmt: skip
    path = out / "summary.json"
    summary: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
    (b, b_se), (a, a_se), (gain, gain_se) = (
        mean_se(before),
        mean_se(after),
        mean_se(after - before),
    )
    summary.update(
        method=method, seed=seed, task="diffusion", reward_before=b, reward_before_se=b_se,
        reward_after=a, reward_after_se=a_se, reward_gain=gain, reward_gain_se=gain_se,
        gain_in_se=gain / gain_se if gain_se > 0 else 0.0, pairs=pairs, steps=steps,
        heldout_samples=before.numel(), seconds=round(time.perf_counter() - start, 1),
        quickstart={"config": asdict(cfg)},
    )  # fmt: skip
    path.write_text(json.dumps(summary, indent=1, default=str), encoding="utf-8")
    return summary
