"""`preftune train ddpo|dpok|d3po|spo|awm --model PIPELINE_FOLDER --prompts FILE --reward NAME`.

The denoiser samples its own images, a reward scores them, and the method updates it
(`online_steps.Method`). The run uses the training parts every `preftune train` uses: the run
folder's lock and resume rules (`train/runfolder.py`, via the scorer loop's `claim`), checkpoints
(`train/checkpoint.py`: the denoiser, the optimizer with the critic's parameter group, the schedule,
the critic's weights), metrics.jsonl, the progress bar on a terminal and plain log lines off it,
summary.json and report.html. Step s takes the prompts `batch_indices(…, step=s)` and draws all its
noise from a generator seeded by (seed, s), so a resumed run takes the same steps as an unbroken one.

Held-out evaluation: `heldout` seeds per prompt (the training prompts, or `--eval-data` prompts),
sampled with the method's own sampler from fixed noise before training and after it; summary.json
holds both mean rewards, the paired gain and its standard error.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig
from preftune.diffusion.online_steps import Method, critic_warmup
from preftune.diffusion.phase import noise_seed
from preftune.diffusion.pipeline_parts import Pipeline, read_prompts
from preftune.errors import ConfigError

# TrainConfig fields an online diffusion run does not read: a value other than the default is refused.
_UNUSED = ("data", "eval_split", "tokenizer", "kind", "columns", "chat_template", "stages", "rounds",
           "apo_alpha", "fsdp", "ref_model", "ref_sync_every", "estimator", "objective", "sampler",
           "teacher", "teacher_ref", "num_iterations", "eval_every", "mixed_precision", "temperature",
           "top_p", "top_k", "kl_coef", "value_lr", "gamma", "lam", "macro", "macro_n", "macro_pooling",
           "dpo_model", "dpo_scale", "dpo_clip", "sampler_args")  # fmt: skip


def check_online_diffusion(config: TrainConfig) -> dict[str, Any]:
    """Refuse what the run cannot do, naming the field and the fix; return the method's options."""
    from preftune.config import _check_range
    from preftune.config_fields import TrainConfig as Fields
    from preftune.diffusion.denoiser import check_pipeline_folder
    from preftune.diffusion_methods import method_options
    from preftune.paths import is_pipeline_folder

    method = config.method.strip()
    for name, flag in (("model", "--model PIPELINE_FOLDER"), ("prompts", "--prompts FILE"),
                       ("reward", "--reward NAME"), ("out", "--out DIR")):  # fmt: skip
        if not getattr(config, name):
            raise ConfigError(f"'{name}' is required for preftune train {method} — pass {flag}")
    if not is_pipeline_folder(config.model):
        raise ConfigError(
            f"--model {config.model}: {method} trains a diffusers pipeline folder (model_index.json); "
            "for a language model use grpo, rloo, ppo, ..."
        )
    check_pipeline_folder(config.model)  # a UNet or an SD3-style transformer, every part in place
    defaults = Fields()
    given = [n for n in _UNUSED if getattr(config, n) != getattr(defaults, n)]
    if given:
        raise ConfigError(
            f"preftune train {method} does not use {', '.join(given)} — remove "
            + ", ".join(f"--{n.replace('_', '-')}" for n in given)
        )
    _check_range(config)
    if str(config.reward).strip() == "shapes":  # the built-in reward reads every prompt: check them now
        from preftune.tasks.shapes import parse_prompt

        for n, text in enumerate(read_prompts(str(config.prompts)), 1):
            try:
                parse_prompt(text)
            except ValueError:
                raise ConfigError(
                    f"{config.prompts}: prompt {n} {text[:80]!r} is not one of the shapes reward's prompts — "
                    "write 'COLOUR square PLACE' (red, green, blue, yellow; top left, top right, bottom "
                    "left, bottom right), or give another --reward"
                ) from None
    return method_options(method, dict(config.hparams))


@dataclass
class Held:
    """The held-out set: prompts (with repeats), their embeddings and fixed noise."""

    texts: list[str]
    cond: torch.Tensor
    noise: torch.Tensor
    seed: int


def heldout_set(method: Method, prompts: list[str], seeds: int, seed: int) -> Held:
    texts = [p for p in prompts for _ in range(seeds)]
    g = torch.Generator().manual_seed(noise_seed(seed, "heldout"))
    return Held(
        texts, method.pipe.encode(texts), method.noise(len(texts), g), noise_seed(seed, "heldout-steps")
    )


def heldout_rewards(method: Method, held: Held, batch: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """(rewards [N], images [N, 3, H, W] in [0, 1]) of the held-out samples, same noise every call."""
    g = torch.Generator().manual_seed(held.seed)
    latents = torch.cat(
        [method.sample(held.cond[i : i + batch], held.noise[i : i + batch], g)
         for i in range(0, len(held.texts), batch)]
    )  # fmt: skip
    with torch.no_grad():
        images = method.pipe.decode(latents)
    return method.reward(images, held.texts).detach().double(), images


def train_online_diffusion(config: TrainConfig, log: Any = print) -> Any:
    """Train `config.model` (a pipeline folder) with online method `config.method`; the run folder
    as any `preftune train` run. Returns the `RunResult`."""
    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as hf_logging

    from preftune.reward.scorer_loop import claim

    hf_logging.disable_progress_bar()  # per-file "Loading weights" / "Writing model shards" bars
    diffusers_logging.disable_progress_bar()
    options = check_online_diffusion(config)
    config = replace(config, hparams=options)  # config.yaml records every option's value
    with claim(config):  # a failed run puts the folder back as it was (RunLock.undo)
        return _train(config, options, log)


def _setup(
    config: TrainConfig, options: dict[str, Any]
) -> tuple[Method, list[str], list[str], Any, Any, int]:
    """(method, training prompts, held-out prompts, optimizer, scheduler, total steps: max_steps, or
    `epochs` passes over the prompts)."""
    from preftune.diffusion.denoiser import load_denoiser
    from preftune.diffusion.image_rewards import load_image_reward
    from preftune.train.api import seed_everything
    from preftune.train.optim import build_optimizer, build_scheduler
    from preftune.train.setup import lora_settings

    seed_everything(config.seed)
    reward = load_image_reward(config.reward)
    prompts = read_prompts(str(config.prompts))
    held = read_prompts(config.eval_data) if config.eval_data else prompts
    unet = load_denoiser(config.model, dtype=config.dtype, lora=lora_settings(config),
                         gradient_checkpointing=config.gradient_checkpointing)  # fmt: skip
    unet.train()
    method = Method.build(config.method.strip(), unet, Pipeline.load(config.model), reward, options, config)
    optimizer = build_optimizer([p for p in unet.parameters() if p.requires_grad], config)
    if method.critic is not None:
        optimizer.add_param_group({"params": list(method.critic.parameters()), "lr": options["critic_lr"]})
    method.optimizer = optimizer
    total = config.max_steps or max(1, math.ceil(config.epochs * len(prompts) / config.batch_size))
    return method, prompts, held, optimizer, build_scheduler(optimizer, config, total), total


def _train(config: TrainConfig, options: dict[str, Any], log: Any) -> Any:
    from preftune.train.digests import rows_digest
    from preftune.train.logging import MetricsLogger, Progress
    from preftune.train.loop import batch_indices
    from preftune.train.signals import Finishing, StepStops

    method, prompts, held_prompts, optimizer, scheduler, total = _setup(config, options)
    out = Path(config.out)
    digests = {"data_digest": rows_digest(prompts), "heldout_digest": rows_digest(held_prompts)}
    start, last, last_good = _resume(config, method, optimizer, scheduler, total, log, digests)
    logger = MetricsLogger(out, sinks=config.report_to, run_name=config.run_name or out.name, config={})
    logger.truncate_after(start)
    progress = Progress(total, enabled=True, live=config.progress, log_every=config.log_every, start=start)
    progress.print(
        f"preftune train {config.method}: {len(prompts)} prompts, {config.batch_size} per step × "
        f"{config.num_generations} samples, {total} steps ({options['sample_steps']} denoising steps)"
    )
    held = heldout_set(method, held_prompts, int(options["heldout"]), config.seed)
    before = _before(method, held, config, logger, start, options, prompts)
    try:
        with StepStops(str(config.out), total) as stops:  # a signal: checkpoint at the step's end, stop
            for step in range(start, total):
                t0 = time.perf_counter()
                idx = batch_indices(len(prompts), config.batch_size, seed=config.seed, phase=0, step=step)
                g = torch.Generator().manual_seed(noise_seed(config.seed, "online", step))
                last = method.step([prompts[i] for i in idx], g)
                last.update(lr=float(scheduler.get_last_lr()[0]), seconds=time.perf_counter() - t0)
                scheduler.step()
                done, saved = step + 1, None
                if done % config.log_every == 0 or done == total:
                    logger.log({"step": done, "split": "train", **last})
                progress.update(done, last)
                if (config.save_every and done % config.save_every == 0) or done == total:
                    last_good = saved = _save(
                        config, method, optimizer, scheduler, done, total, last, digests
                    )
                stops.check(
                    done,
                    saved,
                    lambda d=done, m=last: _save(config, method, optimizer, scheduler, d, total, m, digests),
                )
    finally:
        progress.close()
    with Finishing(str(config.out), total, total) as finishing:  # a signal: say what is saved
        after, images = heldout_rewards(method, held)
        return _finish(config, method, logger, last, last_good, (before, after), images, held, total,
                       progress.print, finishing)  # fmt: skip


def _resume(config: TrainConfig, method: Method, optimizer: Any, scheduler: Any, total: int,
            log: Any, digests: dict[str, str]) -> tuple[int, dict[str, float], Path | None]:  # fmt: skip
    """(first step, last metrics, checkpoint): the denoiser, optimizer (critic included), schedule,
    RNG and critic restored from the checkpoint to resume; (0, {}, None) to start afresh. `digests`:
    of the training and held-out prompts, refused when the checkpoint records others."""
    from preftune.errors import TrainingError
    from preftune.train import checkpoint as ckpt
    from preftune.train import runfolder

    path = runfolder.resume_checkpoint(config)
    if path is None:
        return 0, {}, None
    state, _, extra = ckpt.load_checkpoint(path, model=method.unet, optimizer=optimizer, scheduler=scheduler)
    ckpt.check_position(state, [total], path)
    runfolder.check_resume_data(config, state, digests["data_digest"], path)
    saved = state.get("heldout_digest")
    if config.eval_data and saved and saved != digests["heldout_digest"]:
        raise TrainingError(
            f"resume: eval_data '{config.eval_data}' now holds other prompts than the run's held-out "
            f"rewards before training ({Path(config.out) / BEFORE}) were sampled from (checkpoint {path}): "
            "the file changed since the run started — put it back as it was to continue the run "
            "exactly, or start a new run with another --out"
        )
    _, _, step = runfolder.resume_position(state, total=total, config=config, path=path)
    if method.critic is not None:
        method.critic.load_state_dict(extra["critic"])
    log(f"resuming from step {step} of {total} ({path})")
    return step, dict(state.get("metrics", {})), path


BEFORE = "heldout_before.json"


def _before(method: Method, held: Held, config: TrainConfig, logger: Any, start: int,
            options: dict[str, Any], prompts: list[str]) -> torch.Tensor:  # fmt: skip
    """The pretrained model's held-out rewards (OUT/heldout_before.json, OUT/samples_before.png); at a
    fresh start also the critic's warm-up. A resumed run reads them back."""
    import json

    out = Path(config.out)
    if start > 0 and (out / BEFORE).is_file():
        return torch.tensor(json.loads((out / BEFORE).read_text(encoding="utf-8")), dtype=torch.float64)
    rewards, images = heldout_rewards(method, held)
    (out / BEFORE).write_text(json.dumps(rewards.tolist()), encoding="utf-8")
    (out / "samples_before.png").write_bytes(_grid(images, held))
    logger.log({"step": 0, "split": "eval", "reward": float(rewards.mean())})
    steps = int(options.get("critic_warmup", 0))
    if method.critic is not None and steps and start == 0:
        g = torch.Generator().manual_seed(noise_seed(config.seed, "critic-warmup"))
        critic_warmup(method, prompts[: config.batch_size], steps, g)
    return rewards


def _save(config: TrainConfig, method: Method, optimizer: Any, scheduler: Any, done: int, total: int,
          last: dict[str, float], digests: dict[str, str]) -> Path:  # fmt: skip
    from preftune.train import checkpoint as ckpt

    state = {"phase": 0, "step_in_phase": done, "total_steps": total, "metrics": last, **digests}
    extra = {"critic": method.critic.state_dict()} if method.critic is not None else None
    return ckpt.save_checkpoint(
        Path(config.out) / "checkpoints", done, model=method.unet, optimizer=optimizer, scheduler=scheduler,
        trainer_state=state, loss_state={}, keep_last=config.keep_last, extra=extra,
    )  # fmt: skip


def mean_se(values: torch.Tensor) -> tuple[float, float]:
    """(mean, standard error of the mean) of a 1-D tensor; the error is 0 for one value."""
    n = values.numel()
    return float(values.mean()), float(values.std() / math.sqrt(n)) if n > 1 else 0.0


def _finish(config: TrainConfig, method: Method, logger: Any, last: dict[str, float], last_good: Path | None,
            rewards: tuple[torch.Tensor, torch.Tensor], images: torch.Tensor, held: Held, total: int,
            log: Any, finishing: Any) -> Any:  # fmt: skip
    """OUT/final (the pipeline with the trained denoiser), the held-out numbers, summary.json, report."""
    import json

    from preftune.diffusion.denoiser import save_pipeline
    from preftune.train import runfolder
    from preftune.train.api import RunResult

    out = Path(config.out)
    (b, b_se), (a, a_se), (gain, gain_se) = (mean_se(r) for r in (*rewards, rewards[1] - rewards[0]))
    numbers = {"reward_before": b, "reward_before_se": b_se, "reward": a, "reward_se": a_se,
               "reward_gain": gain, "reward_gain_se": gain_se, "heldout_samples": float(rewards[0].numel()),
               "gain_in_se": gain / gain_se if gain_se > 0 else 0.0}  # fmt: skip
    logger.log({"step": total, "split": "eval", **numbers})
    logger.close()
    save_pipeline(method.unet, config.model, out / "final")
    finishing.wrote("final/")
    (out / "samples_after.png").write_bytes(_grid(images, held))
    summary = {"method": config.method, "steps": total, "train": last, "eval": numbers,
               "checkpoint": str(last_good) if last_good else None}  # fmt: skip
    runfolder.write_atomic(out / "summary.json", json.dumps(summary, indent=1))
    finishing.wrote("summary.json")
    if config.report:
        try:
            from preftune.eval.report import write_report

            grids = {f"held-out samples {k} (rows: prompts, columns: seeds)": (out / f"samples_{k}.png").read_bytes()
                     for k in ("before", "after")}  # fmt: skip
            write_report(out, extra=grids)
        except Exception as err:  # noqa: BLE001 - a report is a convenience; the run has finished
            log(f"report: not written ({type(err).__name__}: {err}) — rebuild it with: preftune report {out}")
    log(f"held-out reward {b:.4f} ± {b_se:.4f} → {a:.4f} ± {a_se:.4f} (paired gain {gain:+.4f} ± {gain_se:.4f})"
        f"; final pipeline in {out / 'final'}")  # fmt: skip
    return RunResult(out, out / "final", total, {**last, **{f"eval/{k}": v for k, v in numbers.items()}})


def _grid(images: torch.Tensor, held: Held) -> bytes:
    """Held-out samples, one row per prompt, one column per seed (at most 16 rows)."""
    from preftune.tasks.shapes import grid_png

    seeds = max(1, held.texts.count(held.texts[0]))
    return grid_png(images[: 16 * seeds] * 2 - 1, columns=seeds)
