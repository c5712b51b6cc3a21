"""Building a run's parts from its config: data, phases (stages / rounds), policy, reference."""

from __future__ import annotations

import copy
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from preftune.config import TrainConfig, reference_strategy
from preftune.errors import ConfigError, DataError
from preftune.models.reference import AdapterReference, ModelReference
from preftune.train.batches import adapt_examples
from preftune.train.distributed import World
from preftune.train.loop import Objective
from preftune.types import Example

log = logging.getLogger("preftune.train")


def load_examples(
    source: str | list[dict[str, Any]],
    config: TrainConfig,
    objective: Objective,
    tokenizer: Any,
    *,
    split: str | None,
    kind: str | None = None,
) -> list[Example]:
    """Tokenized examples of `source` in the layout the objective trains on (see `adapt_examples`)."""
    from preftune.data.pipeline import prepare_examples, ranked_to_pairs

    prepared = prepare_examples(
        source,
        tokenizer=tokenizer,
        kind=kind or config.kind,
        columns=config.columns,
        split=split,
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        max_completion_length=config.max_completion_length,
        truncation=config.truncation,
        max_positions=model_max_positions(config.model),
        on_invalid=config.on_invalid,
        cache_dir=config.cache_dir,
        add_eos=config.add_eos,
        chat_template=config.chat_template,
    )
    examples = prepared.examples
    layout = "pairwise" if objective.kind == "distill" else objective.kind  # distillation reads pairs
    if layout == "pairwise" and any(e.kind == "ranked" for e in examples):
        examples = [
            p
            for e in examples
            for p in (ranked_to_pairs(e, config.ranked_pairs) if e.kind == "ranked" else [e])
        ]
    where = source if isinstance(source, str) else "<curriculum stage>"
    if not examples:
        raise ConfigError(f"{where}: no usable examples (summary: {prepared.summary})")
    pairs = sum(e.kind == "pairwise" for e in examples)
    if objective.kind == "unpaired" and pairs:
        log.warning(
            f"{where}: the loss trains on unpaired examples, so each of the {pairs} pairs is split in "
            f"two: its chosen response a desirable example (label 1), its rejected one an undesirable "
            f"example (label 0) — {2 * pairs} examples"
        )
    return adapt_examples(examples, layout, mismatched=objective.needs_mismatched, where=where)


@functools.lru_cache(maxsize=8)
def model_max_positions(model: str) -> int | None:
    """The model's position limit (`max_position_embeddings`, GPT-2's `n_positions`) from its
    config.json; None when it has none or the config cannot be read (a module, an adapter folder)."""
    try:
        from transformers import AutoConfig

        cfg = AutoConfig.from_pretrained(model)
    except Exception:  # not a loadable model name: the model loader reports that, not this check
        return None
    value = getattr(cfg, "max_position_embeddings", None) or getattr(cfg, "n_positions", None)
    return int(value) if isinstance(value, int) and value > 0 else None


def build_phases(
    config: TrainConfig, examples: list[Example], objective: Objective, tokenizer: Any
) -> list[list[Example]]:
    """The data of each phase: Curry-DPO stages (easy → hard), `rounds` passes, or one phase.

    Curry-DPO (Pattnaik et al. 2024) stages are built from the *raw* ranked records by
    `data.transforms.curry_stages`, then tokenized like any data; the records must use the standard
    field names (prompt, responses, scores).
    """
    if config.stages <= 1:
        return [examples] * config.rounds
    from preftune.data.sources import read_source
    from preftune.data.transforms import curry_stages

    source = read_source(config.data, split=config.split)
    fatal = [p for p in source.problems if p.row is None]
    if fatal:
        raise DataError(fatal[0].render())
    records = [r for _, r in source.rows if r is not None]
    stages = curry_stages(
        records, config.stages, pairs=config.curriculum_pairs, order=config.curriculum_order
    )
    return [
        load_examples(stage, config, objective, tokenizer, split=None, kind="pairwise") for stage in stages
    ]


def phase_steps(config: TrainConfig, phases: Sequence[Sequence[Example]]) -> list[int]:
    """Optimizer steps of each phase: max_steps split evenly (remainder to the last), else epochs."""
    if config.max_steps > 0:
        base, rest = divmod(config.max_steps, len(phases))
        steps = [base] * len(phases)
        steps[-1] += rest
        return steps
    per_epoch = [-(-len(p) // config.batch_size) for p in phases]
    return [max(1, round(config.epochs * n)) for n in per_epoch]


def compute_dtype(config: TrainConfig) -> torch.dtype | None:
    """The dtype forward and backward compute in under mixed precision (None: the weights' own)."""
    return torch.bfloat16 if config.mixed_precision == "bf16" else None


def lora_settings(config: TrainConfig) -> Any:
    if not config.lora:
        return None
    from preftune.models.load import LoraSettings

    targets: list[str] | str = config.lora_target_modules
    if targets != "all-linear":
        targets = [t.strip() for t in str(targets).split(",") if t.strip()]
    return LoraSettings(
        r=config.lora_r, alpha=config.lora_alpha, dropout=config.lora_dropout, target_modules=targets
    )


def load_policy(config: TrainConfig, world: World) -> Any:
    """The policy: a causal LM, or the denoiser of a diffusers pipeline folder (docs/diffusion.md)."""
    from preftune.paths import is_pipeline_folder

    lora, checkpointing = lora_settings(config), config.gradient_checkpointing
    if is_pipeline_folder(config.model):
        from preftune.diffusion.denoiser import load_denoiser

        load: Any = load_denoiser
    else:
        from preftune.models.load import load_causal_lm as load
    return load(config.model, dtype=config.dtype, lora=lora, gradient_checkpointing=checkpointing).to(
        world.device
    )


def trainable_state(model: Any) -> dict[str, torch.Tensor]:
    """Detached copies of the trainable parameters (what Accelerated PO extrapolates)."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def extrapolate(model: Any, previous: dict[str, torch.Tensor], alpha: float) -> None:
    """Accelerated PO (He et al. 2024, Alg. 1): θ_{t+1} = θ̂_{t+1} + α(θ̂_{t+1} − θ̂_t), Nesterov momentum
    between rounds; `model` holds θ̂_{t+1}, `previous` is θ̂_t (the previous round's un-extrapolated
    result, θ̂_0 = θ_0)."""
    for name, p in model.named_parameters():
        if name in previous:
            p.add_(p - previous[name].to(p.device), alpha=alpha)


@dataclass
class ReferenceSetup:
    """The reference of the current phase and what a checkpoint must store to rebuild it."""

    provider: Any  # CachedReference | ModelReference | AdapterReference | None
    strategy: str
    fingerprint: str | None = None

    def moving_weights(
        self, phase: int, config: TrainConfig, *, keep: bool = True
    ) -> dict[str, torch.Tensor] | None:
        """Reference weights to checkpoint: only a separate model that moved (TR-DPO) or is a stage's policy.

        A sharded reference is gathered (a collective: every rank calls this); only `keep` ranks get it."""
        if isinstance(self.provider, ModelReference) and (config.ref_sync_every or phase > 0):
            model = self.provider.model
            if getattr(model, "is_sharded_policy", False):
                from preftune.models.sharding import full_state_dict

                return full_state_dict(model, keep=keep)
            return {k: v.detach() for k, v in model.state_dict().items()}
        return None


def setup_reference(
    config: TrainConfig,
    objective: Objective,
    policy: Any,
    phase: int,
    example_sets: Sequence[Sequence[Example]],
    world: World,
    *,
    log: Callable[[str], None],
    resume_state: dict[str, Any] | None = None,
    resume_weights: dict[str, torch.Tensor] | None = None,
    steps: range | None = None,
) -> ReferenceSetup:
    """Build the reference of `phase` (phase 0: `ref_model` or the initial policy; later phases: the
    policy at the phase start). On a resume in the middle of a phase the reference is rebuilt from
    what the checkpoint recorded (cache fingerprint, or the reference weights). `steps`: the steps of
    the phase this run will take (the cached reference computes only their examples; None: all)."""
    strategy = reference_strategy(config, objective.needs_reference)
    if strategy == "none":
        return ReferenceSetup(None, strategy)
    if strategy == "adapter":
        return ReferenceSetup(AdapterReference(policy), strategy)
    mid_phase = resume_state is not None
    resume_state = resume_state or {}
    if strategy == "model":
        from preftune.models.load import load_causal_lm

        if phase == 0 or mid_phase:
            ref = _load_reference(config).to(world.device)
        elif world.fsdp:  # a copy of the sharded policy: gathered whole on every rank, then sharded again
            from preftune.models.sharding import full_state_dict

            whole = full_state_dict(policy, keep=True)
            ref = load_causal_lm(config.model, dtype=config.dtype).to(world.device)
            ref.load_state_dict(whole)
            del whole
        else:
            ref = copy.deepcopy(policy)
        if mid_phase and resume_weights is not None:
            ref.load_state_dict(resume_weights)
        if world.fsdp:  # sharded like the policy, so that TR-DPO's update is shard by shard
            from preftune.models.sharding import shard_policy

            ref = shard_policy(
                ref,
                device=world.device,
                world_size=world.size,
                compute_dtype=compute_dtype(config),
                inference=True,
            )
        return ReferenceSetup(ModelReference(ref), strategy)
    from preftune.train.refsetup import cached_reference

    return cached_reference(
        config, objective, policy, phase, example_sets, world, log=log, resume_state=resume_state, steps=steps
    )


def _load_reference(config: TrainConfig) -> Any:
    """The frozen reference model of phase 0: `ref_model`, else the policy's initial weights."""
    from preftune.paths import is_pipeline_folder

    name = config.ref_model or config.model
    if is_pipeline_folder(name):
        from preftune.diffusion.denoiser import load_denoiser

        return load_denoiser(name, dtype=config.dtype)
    from preftune.models.load import load_causal_lm

    return load_causal_lm(name, dtype=config.dtype)


def save_final(
    model: Any,
    tokenizer: Any,
    folder: Path,
    state_dict: dict[str, torch.Tensor] | None = None,
    *,
    config: TrainConfig | None = None,
) -> None:
    """OUT/final/: a standard Hugging Face folder (safetensors, or the PEFT adapter) with the tokenizer.

    `state_dict`: whole weights gathered from a sharded (FSDP) `model`, written under its config.
    A LoRA adapter records its base model as an absolute path (or the hub id), so it loads from any
    folder; with `config.merge_lora` final/ holds the merged full model instead, and the adapter
    moves to final/adapter/."""
    import shutil

    tmp = folder.with_name(folder.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    whole = {} if state_dict is None else {"state_dict": state_dict}
    model.save_pretrained(str(tmp), safe_serialization=True, **whole)
    adapter = (tmp / "adapter_config.json").is_file()
    if adapter:
        _absolute_base(tmp / "adapter_config.json", config.model if config else None)
    if adapter and config is not None and config.merge_lora:
        _merge_into(tmp, config)
    tokenizer.save_pretrained(str(tmp))
    if folder.exists():
        shutil.rmtree(folder)
    tmp.rename(folder)


def _absolute_base(path: Path, base: str | None) -> None:
    """Point adapter_config.json's base_model_name_or_path at an absolute folder (a hub id stays)."""
    import json

    cfg = json.loads(path.read_text(encoding="utf-8"))
    name = base or cfg.get("base_model_name_or_path")
    if name and Path(name).exists():
        name = str(Path(name).resolve())
    cfg["base_model_name_or_path"] = name
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def _merge_into(folder: Path, config: TrainConfig) -> None:
    """Replace the adapter in `folder` by the base model with the adapter merged (W + (α/r)·BA,
    peft's merge_and_unload), built on the CPU from the saved adapter so the training model is
    left as it is; the adapter files move to folder/adapter/."""
    import shutil

    from peft import PeftModel

    from preftune.models.load import load_causal_lm

    moved = folder / "adapter"
    moved.mkdir()
    for f in list(folder.iterdir()):
        if f.is_file():
            shutil.move(str(f), moved / f.name)
    base = load_causal_lm(config.model, dtype=config.dtype)
    merged = PeftModel.from_pretrained(base, str(moved)).merge_and_unload()
    merged.save_pretrained(str(folder), safe_serialization=True)
