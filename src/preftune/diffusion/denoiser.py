"""The denoiser of a diffusers pipeline folder as a preftune policy (what `preftune train` trains).

`load_denoiser(folder)` loads the pipeline's denoiser — a UNet2DConditionModel (ε or v
prediction) or an SD3-style SD3Transformer2DModel (rectified flow, pooled text projections) — with
LoRA adapters through `peft` when asked, and attaches a `DiffusionSpec` (the training noise scheduler and prediction type) as `diffusion_spec`;
`models.logprobs.example_stats` hands such a model to `denoising_example_stats`, so the trainer's
step, its exact normalisation, batch statistics, evaluation and the reference strategies
(`model`: a frozen copy; `adapter`: the LoRA policy with adapters disabled) work unchanged.

Each example carries its clean latents and text embeddings (`meta`, see `diffusion.phase`) and the
seed of its noise: ε and t are drawn from `meta["noise_seed"]`, shared by a pair's two images and
identical for the policy and the reference pass of the same step.
"""

from __future__ import annotations

import copy
import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.diffusion.seam import DenoisingStats, denoising_stats, draw_timesteps, prediction_type_of
from preftune.errors import ConfigError
from preftune.types import Example, SequenceStats

# The attention projections the diffusers LoRA scripts adapt (`all-linear` on a UNet means these);
# on an SD3 transformer also the context branch's projections (train_dreambooth_lora_sd3.py's default).
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
TRANSFORMER_LORA_TARGETS = [*LORA_TARGETS, "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out"]
# Transformer denoisers `preftune train` drives (pooled text projections, `seam.denoiser_output`).
TRANSFORMERS = ("SD3Transformer2DModel",)


@dataclass
class DiffusionSpec:
    """How a denoiser is trained: its noise scheduler, prediction type and number of timesteps."""

    scheduler: Any
    prediction_type: str
    num_train_timesteps: int


def pipeline_index(folder: str | Path) -> dict[str, Any]:
    """model_index.json of a pipeline folder; a missing or unreadable one is a ConfigError naming it."""
    file = Path(folder) / "model_index.json"
    try:
        index = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise ConfigError(
            f"{file}: cannot read the pipeline's model_index.json ({err}) — give a folder written by a "
            "diffusers pipeline's save_pretrained"
        ) from None
    if not isinstance(index, dict):
        raise ConfigError(f"{file}: expected a JSON object naming the pipeline's components")
    return index


def denoiser_name(folder: str | Path) -> str:
    """The pipeline's denoiser component: "unet", or "transformer" for an SD3-style transformer."""
    index = pipeline_index(folder)
    if "unet" in index:
        return "unet"
    entry = index.get("transformer")
    kind = entry[1] if isinstance(entry, list) and len(entry) == 2 else None
    if kind in TRANSFORMERS:
        return "transformer"
    found = f"a {kind} transformer" if "transformer" in index else "no denoiser"
    raise ConfigError(
        f"{Path(folder) / 'model_index.json'}: the pipeline has {found}; preftune train supports "
        "UNet2DConditionModel pipelines (Stable Diffusion 1.x/2.x style) and SD3Transformer2DModel "
        "ones (StableDiffusion3Pipeline)"
    )


def check_pipeline_folder(folder: str | Path) -> str:
    """The denoiser's name, after checking that every component model_index.json lists is there
    (its folder, with the config file diffusers reads); a missing one is a ConfigError naming it."""
    name = denoiser_name(folder)
    root = Path(folder)
    for part, entry in sorted(pipeline_index(folder).items()):
        if part.startswith("_") or not isinstance(entry, list) or entry[0] is None:
            continue  # metadata, or a component saved as None (an SD3 pipeline without T5)
        if part.startswith("tokenizer"):
            needed = root / part
        else:
            needed = root / part / ("scheduler_config.json" if part == "scheduler" else "config.json")
        if not needed.exists():
            raise ConfigError(
                f"{root}: model_index.json lists '{part}' ({entry[1]}) but {needed} is missing — save the "
                "whole pipeline with save_pretrained, or remove the component from model_index.json"
            )
    return name


@contextmanager
def component(folder: str | Path, part: str | None) -> Iterator[None]:
    """Loading pipeline component `part` (None: the whole pipeline): a missing or damaged weights file
    (diffusers / transformers raise OSError, or ValueError / safetensors' error for a bad header) is a
    ConfigError naming the folder and the fix, not a traceback."""
    try:
        yield
    except (OSError, ValueError, RuntimeError) as err:
        if isinstance(err, RuntimeError) and "safetensor" not in type(err).__module__ + str(err).lower():
            raise
        where = Path(folder) / part if part else Path(folder)
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ConfigError(
            f"{where}: cannot load the pipeline's {part or 'components'} ({reason}) — its weights file is "
            "missing or damaged: save the whole pipeline again with save_pretrained"
        ) from None


def load_pipeline(folder: str | Path, **kwargs: Any) -> Any:
    """The whole pipeline at `folder` (`DiffusionPipeline.from_pretrained`), naming as None each
    component model_index.json lists as null — diffusers refuses to load an SD3 pipeline saved
    without T5 unless `text_encoder_3=None, tokenizer_3=None` are passed."""
    from diffusers import DiffusionPipeline

    absent = {k: None for k, v in pipeline_index(folder).items() if isinstance(v, list) and v[0] is None}
    with component(folder, None):
        return DiffusionPipeline.from_pretrained(str(folder), **{**absent, **kwargs})


def training_scheduler(folder: str | Path) -> Any:
    """The noise scheduler training draws x_t with: DDPM on the pipeline's schedule (as the diffusers
    training scripts), or flow matching for a flow-matching pipeline."""
    from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

    config = json.loads((Path(folder) / "scheduler" / "scheduler_config.json").read_text(encoding="utf-8"))
    if "FlowMatch" in str(config.get("_class_name", "")):
        return FlowMatchEulerDiscreteScheduler.from_config(config)
    return DDPMScheduler.from_config(config)


def load_denoiser(
    folder: str | Path,
    *,
    dtype: str = "float32",
    lora: Any = None,
    gradient_checkpointing: bool = False,
) -> Any:
    """The pipeline's UNet or SD3 transformer with `diffusion_spec` attached; LoRA adapters (a
    `LoraSettings`; `all-linear` means the attention projections) via peft."""
    import diffusers

    from preftune.models.load import resolve_dtype

    name = check_pipeline_folder(folder)
    model_cls = getattr(diffusers, "UNet2DConditionModel" if name == "unet" else TRANSFORMERS[0])
    with component(folder, name):
        model: Any = model_cls.from_pretrained(str(folder), subfolder=name, torch_dtype=resolve_dtype(dtype))
    if gradient_checkpointing:
        model.enable_gradient_checkpointing()
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        default = LORA_TARGETS if name == "unet" else TRANSFORMER_LORA_TARGETS
        targets = default if lora.target_modules == "all-linear" else list(lora.target_modules)
        model.requires_grad_(False)
        config = LoraConfig(
            r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=targets
        )
        try:
            model = get_peft_model(model, config)
        except ValueError as err:  # peft's "no target module found" (NoMatchingPeftModuleError)
            raise ConfigError(
                f"lora target_modules={targets!r} do not fit the pipeline's {name}: {err} — its attention "
                f"projections are {', '.join(default)} (the default, all-linear)"
            ) from None
    scheduler = training_scheduler(folder)
    kind = prediction_type_of(scheduler)
    total = int(scheduler.config.get("num_train_timesteps", 1000))
    model.diffusion_spec = DiffusionSpec(scheduler, kind, total)
    return model


def is_denoiser(model: Any) -> bool:
    return getattr(model, "diffusion_spec", None) is not None


def example_noise(
    example: Example, shape: torch.Size, total: int, scheduler: Any = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(ε [C, h, w], t [1]) of an example, drawn from its `noise_seed` (shared by its branches): t
    uniform in [0, total), or with a flow-matching `scheduler` t = σ·T, σ logit-normal on its grid."""
    seed = example.meta.get("noise_seed")
    if seed is None:
        raise ConfigError("a diffusion example needs meta['noise_seed'] (set by its phase)")
    g = torch.Generator().manual_seed(int(seed))  # type: ignore[call-overload]
    noise = torch.randn(shape, generator=g)
    if scheduler is not None and prediction_type_of(scheduler) == "flow":
        return noise, draw_timesteps(scheduler, 1, g, "flow")
    return noise, torch.randint(0, total, (1,), generator=g)


def denoising_example_stats(model: Any, examples: list[Example]) -> SequenceStats:
    """The seam's statistic −½·mse of every branch of `examples` (example-major, as `example_stats`).

    x_t comes from forward noise, or — when the examples carry `meta["inversion"]` (InPO, SmPO) —
    from inverting x_0 with the policy (`inversion.invert`); the reference pass of the same step
    reuses the policy's x_t and target (stored in `meta["inverted"]`)."""
    spec: DiffusionSpec = model.diffusion_spec
    latents, noises, steps, conds = [], [], [], []
    for e in examples:
        images: list[torch.Tensor] = e.meta["latents"]  # type: ignore[assignment]
        texts: list[torch.Tensor] = e.meta["text"]  # type: ignore[assignment]
        noise, t = example_noise(e, images[0].shape, spec.num_train_timesteps, spec.scheduler)
        for k, x0 in enumerate(images):
            latents.append(x0)
            noises.append(noise)
            steps.append(t)
            conds.append(texts[k] if len(texts) > 1 else texts[0])
    device = next(model.parameters()).device
    x0s, t_all, cond = (
        torch.stack(latents).to(device),
        torch.cat(steps).to(device),
        torch.stack(conds).to(device),
    )
    if examples and "inversion" in examples[0].meta:
        noisy, target = _inverted(model, examples, x0s, cond, t_all, spec)
        out = model(noisy, t_all, encoder_hidden_states=cond)
        err = (out.sample.float() - target.float()) ** 2
        return DenoisingStats(mse=err.mean(dim=tuple(range(1, err.dim())))).sequence_stats()
    eps = torch.stack(noises).to(device)
    stats = denoising_stats(model, x0s, eps, t_all, cond, spec.scheduler, spec.prediction_type)
    return stats.sequence_stats()


def is_policy_pass(model: Any) -> bool:
    """The trainable policy (not a frozen reference copy, nor the LoRA policy with adapters disabled)."""
    trainable = any(p.requires_grad for p in model.parameters())
    return trainable and not getattr(model, "_adapters_disabled", False)


def _inverted(
    model: Any,
    examples: list[Example],
    x0s: torch.Tensor,
    cond: torch.Tensor,
    t: torch.Tensor,
    spec: DiffusionSpec,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_t, target) of every branch: inverted by the policy, or the policy's stored ones."""
    from preftune.diffusion.inversion import invert

    counts = [len(e.response_ids) for e in examples]
    if not is_policy_pass(model):
        if any("inverted" not in e.meta for e in examples):
            raise ConfigError("inversion: the reference pass ran before the policy inverted these examples")
        parts: list[Any] = [e.meta["inverted"] for e in examples]
        device = x0s.device
        return torch.cat([p[0] for p in parts]).to(device), torch.cat([p[1] for p in parts]).to(device)
    settings: dict[str, Any] = examples[0].meta["inversion"]  # type: ignore[assignment]
    steps = int(settings.get("steps", 10))
    z = [_inversion_noise(e, x0s.shape[1:], steps, k) for e, c in zip(examples, counts) for k in range(c)]
    noise = [torch.stack([row[j] for row in z]).to(x0s.device) for j in range(steps)]
    noisy, target = invert(
        model, x0s, cond, t, spec.scheduler, steps=steps, eta=float(settings.get("eta", 0.1)),
        renoise=bool(settings.get("renoise", False)), noise=noise,
    )  # fmt: skip
    start = 0
    for e, c in zip(examples, counts):
        e.meta["inverted"] = (noisy[start : start + c].detach(), target[start : start + c].detach())
        start += c
    return noisy, target


def _inversion_noise(example: Example, shape: torch.Size, steps: int, branch: int) -> list[torch.Tensor]:
    """The z of each inverse step of one branch (its own stream: InPO's branches share t, not ε)."""
    g = torch.Generator().manual_seed((int(example.meta["noise_seed"]) + 7919 * (branch + 1)) % 2**63)  # type: ignore[call-overload]
    return [torch.randn(shape, generator=g) for _ in range(steps)]


def save_pipeline(model: Any, source: str | Path, folder: Path, *, keep_adapter: bool = True) -> None:
    """`folder` as a copy of the pipeline at `source` with the trained denoiser (LoRA merged into its
    weights; the adapter itself in `folder/adapter/`), written beside and renamed into place."""
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.disable_progress_bar()  # a "Writing model shards" bar per save
    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    name = denoiser_name(source)
    shutil.copytree(str(source), str(tmp), ignore=shutil.ignore_patterns(name))
    if hasattr(model, "merge_and_unload"):
        if keep_adapter:
            model.save_pretrained(str(tmp / "adapter"))
        copy.deepcopy(model).merge_and_unload().save_pretrained(str(tmp / name))
    else:
        model.save_pretrained(str(tmp / name))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)
