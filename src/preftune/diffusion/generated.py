"""Pairs whose loser is generated during training: SePPO's reference samples and PSO's reference images.

Both methods keep the data's preferred image x^w and replace its rejected image by a sample the
model draws for the same prompt at every step (DDIM, η = 0, `sample_steps` steps, from noise seeded
by (seed, phase, step, position), so a resumed run draws what the uninterrupted one drew). The sample
is an *image*, as in both papers: its latent is decoded, rounded to 8-bit pixels and encoded again
(`image_latents`), the way the data's images reach their latents — a raw sampler latent differs from
that in ways the VAE discards, which the loss could tell the two branches apart by instead of by
their content:

- **pso** (Miao et al. 2025): the sample comes from the current policy (the weights of the step);
- **seppo** (Zhang et al. 2024): from the *reference*, a previous checkpoint drawn uniformly from
  the snapshots of the policy taken every `ref_every` steps (θ_0, θ_30, θ_60, ...); the same
  checkpoint is the reference model of the step's loss. The snapshots are checkpointed with the run
  (`state_dict`), so `--resume` restores the pool.

`GeneratedLoserPhase` is a `DiffusionPhase`: `train/api.py` attaches the policy (`attach`) and the
phase's reference provider (`attach_reference`) before the first batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import torch

from preftune.diffusion.phase import DiffusionPhase, noise_seed
from preftune.errors import ConfigError
from preftune.types import Example

GENERATED_LOSER_METHODS = ("seppo", "pso")


@torch.no_grad()
def ddim_sample(
    unet: Any, scheduler_config: Any, cond: torch.Tensor, noise: torch.Tensor, steps: int
) -> torch.Tensor:
    """Clean latents [N, C, h, w] by DDIM (η = 0, no guidance) on the pipeline's scheduler config from
    initial noise [N, C, h, w] (as `StableDiffusionPipeline` with a DDIMScheduler and guidance 1)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(steps)
    x = noise * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        pred = unet(scheduler.scale_model_input(x, t), t, encoder_hidden_states=cond).sample
        x = scheduler.step(pred, t, x).prev_sample
    return x


@torch.no_grad()
def image_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The latents of the images `latents` decode to, as the data's images get theirs: decode, clamp to
    [−1, 1], round to 8 bits (an image file), encode (posterior mean, `encode.vae_latents`)."""
    from preftune.diffusion.encode import vae_latents

    shift = getattr(vae.config, "shift_factor", None) or 0.0
    decoded = vae.decode(latents.to(vae.device, vae.dtype) / vae.config.scaling_factor + shift).sample
    pixels = torch.round((decoded.float().clamp(-1.0, 1.0) + 1.0) * 127.5) / 127.5 - 1.0
    return vae_latents(vae, pixels)


def generation_settings(objective: Any) -> dict[str, Any] | None:
    """{"method", "sample_steps", "snapshot_every" (seppo's `ref_every`)} of a seppo / pso term, else None."""
    for spec, _, hparams in objective.terms:
        if spec.name in GENERATED_LOSER_METHODS:
            return {
                "method": spec.name,
                "sample_steps": int(hparams["sample_steps"]),
                "snapshot_every": int(hparams.get("ref_every", 0)),
            }
    return None


def check_generation_config(config: Any, settings: dict[str, Any], reference: str) -> None:
    """What a seppo / pso run cannot do: several rounds; a flow-matching (SD3) pipeline, which the DDIM
    sampler of the losers does not drive; seppo without a separate reference model."""
    from preftune.diffusion.denoiser import training_scheduler
    from preftune.diffusion.seam import prediction_type_of

    method = settings["method"]
    if prediction_type_of(training_scheduler(config.model)) == "flow":
        raise ConfigError(
            f"{method} samples its losers with DDIM on a UNet (VP) pipeline; {config.model} is a "
            "flow-matching pipeline — use dpo (Flow-DPO) or another loss"
        )
    if config.rounds > 1:
        raise ConfigError(f"{method} samples its losers every step: rounds must be 1 (got {config.rounds})")
    if method == "seppo" and (config.lora or reference != "model"):
        raise ConfigError(
            "seppo loads previous checkpoints of the whole denoiser into its reference: train without "
            "--lora and with reference=model (or auto)"
        )


@dataclass
class GeneratedLoserPhase(DiffusionPhase):
    """`DiffusionPhase` whose batches have a generated loser (module docstring)."""

    method: str = "pso"
    sample_steps: int = 4
    snapshot_every: int = 30
    vae: Any = None  # the pipeline's VAE (`image_latents`); None keeps the sampler's latents
    policy: Any = None
    reference: Any = None
    snapshots: list[tuple[int, dict[str, torch.Tensor]]] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def sampler(self) -> GeneratedLoserPhase:
        """What the trainer checkpoints as `extra["sampler"]`: this phase's snapshot pool."""
        return self

    def attach(self, model: Any) -> None:
        self.policy = model
        if self.vae is not None:
            self.vae.to(next(model.parameters()).device)

    def attach_reference(self, provider: Any) -> None:
        if self.method == "seppo" and not hasattr(getattr(provider, "model", None), "load_state_dict"):
            raise ConfigError("seppo needs a separate reference model (reference=model)")
        self.reference = provider

    def batch(self, step: int) -> list[Example]:
        examples = super().batch(step)
        if not examples:
            return examples
        if self.policy is None:
            raise ConfigError(f"{self.method}: the phase samples with the policy; attach it first")
        model = self.policy if self.method == "pso" else self._reference_for(step)
        spec = self.policy.diffusion_spec
        device = next(self.policy.parameters()).device
        conds, noises = [], []
        for j, e in enumerate(examples):
            texts: list[torch.Tensor] = e.meta["text"]  # type: ignore[assignment]
            shape = e.meta["latents"][0].shape  # type: ignore[index]
            g = torch.Generator().manual_seed(noise_seed(self.seed, self.index, step, j, "loser"))
            noises.append(torch.randn(shape, generator=g))
            conds.append(texts[0])
        was_training = model.training
        model.eval()
        samples = ddim_sample(
            model, spec.scheduler.config, torch.stack(conds).to(device), torch.stack(noises).to(device),
            self.sample_steps,
        ).cpu()  # fmt: skip
        if self.vae is not None:
            samples = image_latents(self.vae, samples)
        model.train(was_training)
        return [
            replace(e, meta={**e.meta, "latents": [e.meta["latents"][0], samples[j]], "text": [conds[j]]})  # type: ignore[index]
            for j, e in enumerate(examples)
        ]

    def _reference_for(self, step: int) -> Any:
        """SePPO: snapshot the policy when due, then load a uniformly drawn snapshot into the reference."""
        if self.reference is None:
            raise ConfigError("seppo: the phase needs the reference model; attach it first")
        if step % self.snapshot_every == 0 and all(s != step for s, _ in self.snapshots):
            state = {k: v.detach().cpu().clone() for k, v in self.policy.state_dict().items()}
            self.snapshots.append((step, state))
        g = torch.Generator().manual_seed(noise_seed(self.seed, self.index, step, "reference"))
        pick = int(torch.randint(len(self.snapshots), (1,), generator=g))
        chosen, weights = self.snapshots[pick]
        self.reference.model.load_state_dict(weights)
        self.metrics = {"seppo/reference_step": float(chosen), "seppo/snapshots": float(len(self.snapshots))}
        return self.reference.model

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The snapshot pool as flat tensors ("steps" and "SNAPSHOT.PARAM")."""
        out = {"steps": torch.tensor([s for s, _ in self.snapshots], dtype=torch.int64)}
        for i, (_, weights) in enumerate(self.snapshots):
            out.update({f"{i}.{k}": v for k, v in weights.items()})
        return out if self.snapshots else {}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if not state:
            return
        steps = [int(s) for s in state["steps"].tolist()]
        pools: list[dict[str, torch.Tensor]] = [{} for _ in steps]
        for key, value in state.items():
            if key != "steps":
                index, _, name = key.partition(".")
                pools[int(index)][name] = value
        self.snapshots = list(zip(steps, pools))
