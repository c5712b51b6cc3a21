"""`preftune sample --model PIPELINE_FOLDER --prompts FILE --out DIR`: images and their rewards.

Any diffusers text-to-image pipeline folder preftune trains: UNet ε/v pipelines and flow-matching ones
(SD3-style transformers, or a UNet with a FlowMatch scheduler). Plain sampling runs `--solver` (default
DDIM, η = 0, for ε/v pipelines and the flow-matching Euler ODE for flow ones; `sampling.SOLVERS` lists
which solver takes which kind). Two inference-time alignment options steer it with `--reward`
(nothing is trained):

- `--reno`: ReNO (Eyring et al. 2024, arXiv 2406.04312) — gradient ascent on the initial noise of the
  one-step generator x̂_0(ε) (the x̂_0 prediction from the top timestep of the sampler's grid), the
  reward computed on the decoded image (it must be differentiable: return a tensor computed from the
  images); the image is the best one seen (`reno.reno`). For one-step (timestep-distilled) models;
  on a multi-step model x̂_0 of pure noise is a blurred mean image. On a flow x̂_0 = x − σ v_θ.
- `--dts N`: DTS (Jain et al. 2025, arXiv 2506.20701) — a tree over the stochastic reverse chain (DDIM
  η = 1 on ε/v pipelines, Flow-GRPO's SDE with noise level 0.7 on flow ones, `flow_policy`) grown by
  N rollouts, soft values backed up from the reward (`tree.tree_sample`); `--dts-mode search` is DTS*
  (the best rollout found).

DIR/images/NNNNN.png and DIR/samples.jsonl: one row per image {prompt, seed, image, reward, how}.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.diffusion.pipeline_parts import Pipeline, latent_shape, read_prompts
from preftune.errors import ConfigError


@dataclass
class SampleOptions:
    per_prompt: int = 1
    steps: int = 20
    seed: int = 0
    reward: str | None = None
    reno: bool = False
    reno_iterations: int = 50
    dts: int = 0
    dts_mode: str = "sample"
    lam: float = 1.0
    branching: int = 4
    solver: str | None = None  # None: sampling.default_solver of the pipeline


def check_sample_options(o: SampleOptions, out: Path) -> None:
    """Refuse what cannot run, naming the flag and the fix."""
    if (o.reno or o.dts) and not o.reward:
        raise ConfigError(f"--{'reno' if o.reno else 'dts'} steers sampling by a reward: pass --reward NAME")
    if o.reno and o.dts:
        raise ConfigError("--reno and --dts are two ways of steering one sample: pass one of them")
    if o.solver and (o.reno or o.dts):
        raise ConfigError(
            f"--solver sets plain sampling; --{'reno' if o.reno else 'dts'} runs its own sampler — drop --solver"
        )
    for name in ("per_prompt", "steps", "reno_iterations", "branching"):
        if getattr(o, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} {getattr(o, name)}: must be ≥ 1")
    if o.dts < 0 or o.lam <= 0:
        raise ConfigError("--dts N needs N ≥ 1 rollouts and --lam > 0")
    if o.dts_mode not in ("sample", "search"):
        raise ConfigError(f"--dts-mode {o.dts_mode!r}: sample (DTS) or search (DTS*)")
    if (out / "samples.jsonl").exists():
        raise ConfigError(f"--out {out} already holds samples.jsonl — pass another --out or delete it")


def run_sample(
    model: str, prompts_file: str, out: str | Path, options: SampleOptions, log: Any = print
) -> Path:
    """Sample every prompt `per_prompt` times (noise seeds seed, seed + 1, ...); returns samples.jsonl."""
    from diffusers.utils import logging as diffusers_logging

    from preftune.diffusion.denoiser import load_denoiser
    from preftune.diffusion.image_rewards import load_image_reward
    from preftune.paths import is_pipeline_folder
    from preftune.tasks.shapes import to_png

    diffusers_logging.disable_progress_bar()  # "Loading pipeline components" of the caption encoder
    folder = Path(out)
    check_sample_options(options, folder)
    if not is_pipeline_folder(model):
        raise ConfigError(f"--model {model}: not a diffusers pipeline folder (no model_index.json)")
    from preftune.diffusion.denoiser import check_pipeline_folder, training_scheduler
    from preftune.diffusion.sampling import solver_scheduler

    check_pipeline_folder(model)  # a UNet or an SD3-style transformer, every part in place
    if options.solver:
        solver_scheduler(options.solver, training_scheduler(model))  # refuse before loading anything
    prompts = read_prompts(prompts_file)
    from preftune.diffusion.encode import cut_captions_note

    note = cut_captions_note(model, ((p, f"{prompts_file} prompt {i}") for i, p in enumerate(prompts, 1)))
    if note:
        log(note)
    reward = load_image_reward(options.reward) if options.reward else None
    unet = load_denoiser(model).eval().requires_grad_(False)
    pipe = Pipeline.load(model)
    how = (
        "reno"
        if options.reno
        else f"dts{'*' if options.dts_mode == 'search' else ''}"
        if options.dts
        else "ode"
    )
    (folder / "images").mkdir(parents=True, exist_ok=True)
    rows = []
    for i, prompt in enumerate(p for p in prompts for _ in range(options.per_prompt)):
        seed = options.seed + i % options.per_prompt
        g = torch.Generator().manual_seed(seed)
        noise = torch.randn((1, *latent_shape(unet)), generator=g)
        image = _one(unet, pipe, prompt, noise, g, reward, options)
        name = f"images/{i:05d}.png"
        (folder / name).write_bytes(to_png(image[0] * 2 - 1))
        row: dict[str, Any] = {"prompt": prompt, "seed": seed, "image": name, "how": how}
        if reward is not None:
            with torch.no_grad():
                row["reward"] = float(reward(image, [prompt])[0])
        rows.append(row)
    path = folder / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    scored = [r["reward"] for r in rows if "reward" in r]
    log(f"{len(rows)} images in {folder / 'images'}; {path}"
        + (f"; mean reward {sum(scored) / len(scored):.4f}" if scored else ""))  # fmt: skip
    return path


def _one(unet: Any, pipe: Pipeline, prompt: str, noise: torch.Tensor, g: torch.Generator, reward: Any,
         o: SampleOptions) -> torch.Tensor:  # fmt: skip
    """[1, 3, H, W] image in [0, 1] of one prompt from `noise`."""
    from preftune.diffusion.flow_policy import make_policy

    cond = pipe.encode([prompt])
    if o.reno or o.dts:
        policy = make_policy(pipe.scheduler, o.steps, eta=1.0)
        if o.reno:
            return _reno(unet, pipe, policy, cond, prompt, noise, reward, o)
        from preftune.diffusion.tree import policy_step, tree_sample

        def latent_reward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                return reward(pipe.decode(x), [prompt])  # type: ignore[no-any-return]

        result = tree_sample(policy_step(unet, policy, cond, g), latent_reward, noise, o.steps, iterations=o.dts,
                             lam=o.lam, branching=o.branching, mode=o.dts_mode, generator=g)  # fmt: skip
        with torch.no_grad():
            return pipe.decode(result.sample)
    with torch.no_grad():
        return pipe.decode(ode_sample(unet, pipe, cond, noise, o.steps, o.solver))


def ode_sample(
    unet: Any, pipe: Pipeline, cond: torch.Tensor, noise: torch.Tensor, steps: int, solver: str | None = None
) -> torch.Tensor:
    """Final latents of `solver` (`sampling.SOLVERS`; default DDIM η = 0 on the pipeline's schedule, or
    the flow-matching Euler ODE)."""
    from preftune.diffusion.generated import ddim_sample
    from preftune.diffusion.sampling import default_solver, solve, solver_scheduler

    name = solver or default_solver(pipe.scheduler)
    if name == "ddim":
        return ddim_sample(unet, pipe.scheduler.config, cond, noise, steps)
    return solve(unet, solver_scheduler(name, pipe.scheduler), cond, noise, steps)


def _reno(unet: Any, pipe: Pipeline, policy: Any, cond: torch.Tensor, prompt: str, noise: torch.Tensor,
          reward: Any, o: SampleOptions) -> torch.Tensor:  # fmt: skip
    """ReNO on x̂_0(ε) from the first (noisiest) step of the sampler's grid; the decoded best image."""
    from preftune.diffusion.reno import reno

    def generate(eps_noise: torch.Tensor) -> torch.Tensor:
        return pipe.decode(policy.x0_at(unet, eps_noise, policy.timesteps[0], cond))

    def image_reward(images: torch.Tensor) -> torch.Tensor:
        values = reward(images, [prompt])
        if not values.requires_grad:
            raise ConfigError(
                f"--reno: reward '{reward.name}' gives no gradient — return a torch tensor computed from "
                "the images (not a list of floats), or sample with --dts"
            )
        return values  # type: ignore[no-any-return]

    with torch.enable_grad():
        return reno(generate, [(image_reward, 1.0)], noise, iterations=o.reno_iterations).images
