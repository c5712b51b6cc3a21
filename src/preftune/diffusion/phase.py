"""The examples of a diffusion preference run: image records → `Example`s with cached latents, and
the phase that gives each step's examples their noise seeds.

An image example is a language `Example` whose branches are images: `response_ids` holds one
placeholder per image (so batching, sharding and `build_batch` apply as they are), `meta["latents"]`
the clean latents [C, h, w] per branch, `meta["text"]` one embedding [L, D] (shared caption) or one
per branch (two-caption rows), `label` the per-image label (Diffusion-KTO). `DiffusionPhase.batch`
adds `meta["noise_seed"]`, a function of (seed, phase, step, position) only, so a resumed run draws
the same ε and t; held-out examples keep one seed each for the whole run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from preftune.diffusion.imagedata import ImageRecord, read_image_records
from preftune.errors import ConfigError
from preftune.train.run import OfflinePhase
from preftune.types import Example


def noise_seed(*parts: object) -> int:
    """A 63-bit seed from the parts' text (distinct parts, independent seeds)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


@dataclass
class DiffusionPhase(OfflinePhase):
    """An offline phase over image examples: `OfflinePhase`'s batches, each example with the noise seed
    of its place in the step."""

    def batch(self, step: int) -> list[Example]:
        chosen = super().batch(step)
        return [
            replace(e, meta={**e.meta, "noise_seed": noise_seed(self.seed, self.index, step, j)})
            for j, e in enumerate(chosen)
        ]


def to_examples(
    records: Sequence[ImageRecord], latents: dict[str, torch.Tensor], texts: dict[str, torch.Tensor]
) -> list[Example]:
    """One `Example` per record (pairwise: [chosen, rejected]; unpaired: [image] with its label)."""
    out = []
    for r in records:
        meta: dict[str, object] = {
            "latents": [latents[d] for d in r.digests],
            "text": [texts[c] for c in r.captions],
            # what the run digest covers (`digests.image_rows_digest`): the images' SHA-256 (the
            # latent cache's keys, hashed once when read) and the captions
            "image_digests": r.digests,
            "captions": r.captions,
        }
        out.append(
            Example(
                prompt_ids=[],
                response_ids=[[0] for _ in r.images],
                kind="pairwise" if r.kind == "pairwise" else "unpaired",
                label=r.label,
                source_row=r.row,
                meta=meta,
            )
        )
    return out


def adapt_image_examples(examples: list[Example], loss_kind: str, where: str) -> list[Example]:
    """Examples in the layout the loss trains on: a pairwise loss needs pairs; an unpaired loss takes
    per-image rows, or splits each pair into its chosen (label 1) and rejected (label 0) image."""
    if loss_kind not in ("pairwise", "unpaired"):
        raise ConfigError(f"image data trains pairwise or unpaired losses, not {loss_kind} ones")
    out: list[Example] = []
    for e in examples:
        if loss_kind == e.kind:
            out.append(e)
        elif loss_kind == "pairwise":
            raise ConfigError(
                f"{where}: row {e.source_row} is a per-image row (prompt, image, label) but the loss is "
                "pairwise — use diff_kto, or pairs of images"
            )
        else:
            texts: list[Any] = e.meta["text"]  # type: ignore[assignment]
            latents: list[Any] = e.meta["latents"]  # type: ignore[assignment]
            for k, label in ((0, 1.0), (1, 0.0)):
                meta = {
                    **e.meta,
                    "latents": [latents[k]],
                    "text": [texts[k] if len(texts) > 1 else texts[0]],
                }
                out.append(replace(e, response_ids=[[0]], kind="unpaired", label=label, meta=meta))
    return out


def load_image_examples(
    source: str,
    config: Any,
    loss_kind: str,
    *,
    split: str | None,
    log: Callable[[str], None],
    scored: bool = False,
) -> list[Example]:
    """Validated, encoded (cached) examples of an image preference file for a loss of `loss_kind`;
    `scored` (SmPO): every pair must carry its scores, checked before the images are encoded."""
    from preftune.diffusion.encode import encode_records
    from preftune.paths import cache_root

    records, counts = read_image_records(source, split=split, on_invalid=config.on_invalid)
    dropped = [f"{counts[k]} {k}" for k in ("ties", "invalid") if counts[k]]
    log(
        f"{source}: {len(records)} image rows of {counts['rows']}"
        + (f" ({', '.join(dropped)} dropped)" if dropped else "")
    )
    if not records:
        raise ConfigError(f"{source}: no usable image preference rows")
    unscored = next((r for r in records if r.label is None), None) if scored else None
    if unscored is not None:
        raise ConfigError(
            f"{source}:{unscored.row}: smpo needs chosen_score and rejected_score on every pair (its smoothed "
            "label p = σ(s_w − s_l)) — add both (normalised reward scores) to every row, or train dpo"
        )
    cache = Path(config.cache_dir) / "diffusion" if config.cache_dir else cache_root() / "diffusion"
    latents, texts = encode_records(records, config.model, data_path=source, cache_dir=cache, log=log)
    return adapt_image_examples(to_examples(records, latents, texts), loss_kind, source)


def check_diffusion_config(config: Any, strategy: str) -> None:
    """What `preftune train` on a pipeline folder cannot do (yet)."""
    if strategy == "cache":
        raise ConfigError(
            "reference=cache stores fixed log-probs, but a diffusion statistic depends on the noise drawn "
            "each step — use reference=model (a frozen copy), adapter (with lora) or auto"
        )
    unsupported = [n for n in ("fsdp", "apo_alpha", "ref_sync_every") if getattr(config, n)]
    if config.stages > 1:
        unsupported.append("stages")
    if unsupported:
        raise ConfigError(f"diffusion training cannot use {', '.join(unsupported)} yet — remove them")


def inversion_settings(objective: Any) -> dict[str, object] | None:
    """How x_t is made when a term inverts x_0 (inpo: DDIM inversion), else None (forward noise)."""
    for spec, _, hparams in objective.terms:
        if spec.name == "inpo":
            return {"steps": int(hparams["inversion_steps"]), "eta": float(hparams["inversion_eta"])}
        if spec.name == "smpo":  # SmPO: InPO's inversion with ReNoise steps (its defaults)
            return {"steps": 10, "eta": 0.1, "renoise": True}
    return None


def check_flow_objective(folder: str, objective: Any) -> None:
    """The pipeline folder is whole (`check_pipeline_folder`), and a flow-matching one (SD3) is not
    asked for DDIM/ReNoise inversion (inpo, smpo: defined on a VP schedule; ε-, v- and x_0-prediction are inverted)."""
    from preftune.diffusion.denoiser import check_pipeline_folder, training_scheduler
    from preftune.diffusion.seam import prediction_type_of

    check_pipeline_folder(folder)
    if inversion_settings(objective) is None:
        return
    if prediction_type_of(training_scheduler(folder)) == "flow":
        name = next(s.name for s, _, _ in objective.terms if s.name in ("inpo", "smpo"))
        raise ConfigError(
            f"{name} inverts images with DDIM on a variance-preserving schedule; {folder} is a flow-matching "
            "pipeline — use dpo (Flow-DPO on the rectified-flow statistic) or another loss"
        )


def diffusion_sources(
    config: Any, objective: Any, log: Callable[[str], None] = print
) -> tuple[list[OfflinePhase], list[Example]]:
    """(phase sources, held-out examples) of a diffusion run: one phase per round over the examples."""
    from preftune.config import reference_strategy
    from preftune.diffusion.generated import (
        GeneratedLoserPhase,
        check_generation_config,
        generation_settings,
    )
    from preftune.train.setup import phase_steps

    strategy = reference_strategy(config, objective.needs_reference)
    check_diffusion_config(config, strategy)
    check_flow_objective(config.model, objective)
    generated = generation_settings(objective)
    if generated is not None:
        from preftune.diffusion.encode import load_vae

        check_generation_config(config, generated, strategy)
        generated["vae"] = load_vae(config.model)
    scored = any(spec.name == "smpo" for spec, _, _ in objective.terms)
    examples = load_image_examples(
        config.data, config, objective.kind, split=config.split, log=log, scored=scored
    )
    held: list[Example] = []
    if config.eval_data:
        held = load_image_examples(config.eval_data, config, objective.kind, split=config.eval_split, log=log)
        held = [
            replace(e, meta={**e.meta, "noise_seed": noise_seed(config.seed, "eval", i)})
            for i, e in enumerate(held)
        ]
    inversion = inversion_settings(objective)
    if inversion is not None:
        examples = [replace(e, meta={**e.meta, "inversion": inversion}) for e in examples]
        held = [replace(e, meta={**e.meta, "inversion": inversion}) for e in held]
    phases = [examples] * config.rounds
    sources: list[OfflinePhase] = [
        DiffusionPhase(i, data, n, config.batch_size, config.seed)
        if generated is None
        else GeneratedLoserPhase(i, data, n, config.batch_size, config.seed, **generated)
        for i, (data, n) in enumerate(zip(phases, phase_steps(config, phases)))
    ]
    return sources, held
