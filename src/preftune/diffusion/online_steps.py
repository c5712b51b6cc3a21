"""One iteration of each online diffusion method on a batch of prompts, as `preftune train` runs it.

`Method` binds a method name to the denoiser, the pipeline's frozen parts, the reward and the
options (`preftune.diffusion_methods`), and calls the Python steps: `online.ddpo_step`,
`online.dpok_step`, `steppairs.d3po_step`, `steppairs.spo_pairs` + `spo_update`, `awm.awm_step`.
Each iteration draws its noise from the generator it is given, so a resumed run repeats it exactly.

Batches: B prompts × G samples (`batch_size`, `num_generations`); D3PO samples G/2 noises per prompt,
each denoised twice (its pair). SPO's step-aware preference model and DPOK's value baseline are a
`critics.LatentCritic` trained in the same optimizer (a parameter group of their own, `critic_lr`).
SPO's paper fine-tunes its step-aware model once, before RL, on noisy latents of ranked images; here
it is fitted on the pretrained model's samples ranked by the reward (`critic_warmup` steps) and then
one step per iteration on the iteration's own samples (best vs worst of each prompt) — what the
CLI can do without a separate preference data set.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

import torch

from preftune.diffusion.image_rewards import ImageReward
from preftune.diffusion.pipeline_parts import Pipeline, latent_shape
from preftune.errors import ConfigError


@dataclass
class Method:
    """A method's fixed parts; `step(prompts, generator)` runs one iteration and returns its metrics."""

    name: str
    unet: Any
    pipe: Pipeline
    reward: ImageReward
    options: dict[str, Any]
    num_generations: int
    max_grad_norm: float
    policy: Any = None  # the DDIM policy (ddpo, dpok, d3po, spo)
    critic: Any = None  # DPOK's value, SPO's step-aware preference model
    reference: Any = None  # the frozen pretrained denoiser (DPOK's KL, AWM's β term)
    optimizer: Any = None
    seen: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def build(cls, name: str, unet: Any, pipe: Pipeline, reward: ImageReward, options: dict[str, Any],
              config: Any) -> Method:  # fmt: skip
        """Check the pipeline suits the method; the policy, critic and reference it needs."""
        from preftune.diffusion.critics import LatentCritic
        from preftune.diffusion.flow_policy import make_policy

        m = cls(name, unet, pipe, reward, options, config.num_generations, config.max_grad_norm)
        if name == "awm" and not pipe.is_flow:
            raise ConfigError(
                f"--model {pipe.folder}: awm trains flow-matching pipelines (a FlowMatch scheduler), this "
                f"one has {type(pipe.scheduler).__name__} — use ddpo, dpok, d3po or spo"
            )
        if name != "awm":  # DDIM η on ε/v pipelines, Flow-GRPO's SDE on flow-matching ones
            m.policy = make_policy(pipe.scheduler, int(options["sample_steps"]), eta=float(options["eta"]),
                                   noise_level=float(options["noise_level"]))  # fmt: skip
        if name == "dpok" or (name == "spo" and options["scorer"] == "critic"):
            m.critic = LatentCritic(latent_shape(unet)[0], pipe.text_dim)
        if name in ("dpok", "awm"):
            m.reference = copy.deepcopy(unet).requires_grad_(False).eval()
        if name == "d3po" and (config.num_generations < 2 or config.num_generations % 2):
            raise ConfigError(
                f"d3po compares two samples of one noise: --num-generations must be even and ≥ 2 (got "
                f"{config.num_generations}; an odd count would leave one sample of each prompt unused)"
            )
        return m

    def rows(self, prompts: list[str]) -> tuple[list[str], torch.Tensor]:
        """The sampled rows' prompts and their prompt ids (G per prompt; D3PO: G/2 noises)."""
        per = max(1, self.num_generations // 2) if self.name == "d3po" else self.num_generations
        texts = [p for p in prompts for _ in range(per)]
        return texts, torch.arange(len(prompts)).repeat_interleave(per)

    def reward_fn(self, texts: list[str]) -> Any:
        """The latent reward of `texts`' rows; the last values are kept in `seen["rewards"]`."""
        inner = self.pipe.latent_reward(self.reward, texts)

        def fn(latents: torch.Tensor) -> torch.Tensor:
            values = inner(latents)
            self.seen["rewards"] = values
            return values

        return fn

    def noise(self, n: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randn((n, *latent_shape(self.unet)), generator=generator)

    def step(self, prompts: list[str], generator: torch.Generator) -> dict[str, float]:
        texts, ids = self.rows(prompts)
        cond, noise = self.pipe.encode(texts), self.noise(len(texts), generator)
        metrics = STEPS[self.name](self, texts, ids, cond, noise, generator)
        r = self.seen["rewards"].float()
        return {"reward": float(r.mean()), "reward_std": float(r.std()) if r.numel() > 1 else 0.0, **metrics}

    @torch.no_grad()
    def sample(self, cond: torch.Tensor, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """Final latents with the method's own sampler (held-out evaluation)."""
        from preftune.diffusion.awm import sample_flow
        from preftune.diffusion.policy import sample_trajectory

        if self.policy is None:
            return sample_flow(self.unet, self.pipe.scheduler, cond, noise, int(self.options["sample_steps"]))
        return sample_trajectory(self.unet, self.policy, cond, noise, generator).final


def _ddpo(m: Method, texts: list[str], ids: torch.Tensor, cond: Any, noise: Any, g: Any) -> dict[str, float]:
    from preftune.diffusion.online import ddpo_step

    o = m.options
    return ddpo_step(m.unet, m.optimizer, m.policy, cond, ids, m.reward_fn(texts), noise=noise, generator=g,
                     inner_epochs=int(o["inner_epochs"]), clip_range=float(o["clip_range"]),
                     adv_clip=float(o["adv_clip"]), max_grad_norm=m.max_grad_norm)  # fmt: skip


def _dpok(m: Method, texts: list[str], ids: torch.Tensor, cond: Any, noise: Any, g: Any) -> dict[str, float]:
    from preftune.diffusion.online import dpok_step

    o = m.options
    return dpok_step(m.unet, m.reference, m.critic, m.optimizer, m.optimizer, m.policy, cond,
                     m.reward_fn(texts), noise=noise, generator=g, reward_weight=float(o["reward_weight"]),
                     kl_weight=float(o["kl_weight"]), clip_range=float(o["clip_range"]),
                     max_grad_norm=m.max_grad_norm)  # fmt: skip


def _d3po(m: Method, texts: list[str], ids: torch.Tensor, cond: Any, noise: Any, g: Any) -> dict[str, float]:
    from preftune.diffusion.steppairs import d3po_step

    o = m.options
    return d3po_step(m.unet, m.optimizer, m.policy, cond, m.reward_fn(texts + texts), noise=noise,
                     generator=g, beta=float(o["beta"]), eps=float(o["clip_range"]),
                     max_grad_norm=m.max_grad_norm)  # fmt: skip


def _spo(m: Method, texts: list[str], ids: torch.Tensor, cond: Any, noise: Any, g: Any) -> dict[str, float]:
    from preftune.diffusion.steppairs import spo_pairs, spo_update

    o = m.options
    scorer = m.critic if o["scorer"] == "critic" else x0_scorer(m, texts)
    pairs, final = spo_pairs(m.unet, m.policy, scorer, cond, noise, candidates=int(o["candidates"]),
                             threshold=float(o["threshold"]), skip_steps=int(o["skip_steps"]),
                             generator=g)  # fmt: skip
    out = spo_update(m.unet, m.optimizer, m.policy, pairs, beta=float(o["beta"]), eps=float(o["clip_range"]),
                     max_grad_norm=m.max_grad_norm)  # fmt: skip
    rewards = m.reward_fn(texts)(final)
    if m.critic is not None:
        out["critic_loss"] = critic_step(m, final, rewards, ids, cond, g)
    return out


def _awm(m: Method, texts: list[str], ids: torch.Tensor, cond: Any, noise: Any, g: Any) -> dict[str, float]:
    from preftune.diffusion.awm import awm_step

    o = m.options
    return awm_step(m.unet, m.optimizer, m.pipe.scheduler, cond, ids, m.reward_fn(texts), noise=noise,
                    num_steps=int(o["sample_steps"]), reference=m.reference, train_times=int(o["train_times"]),
                    weighting=str(o["weighting"]), clip_range=float(o["clip_range"]),
                    beta=float(o["kl_weight"]), generator=g, max_grad_norm=m.max_grad_norm)  # fmt: skip


def x0_scorer(m: Method, texts: list[str]) -> Any:
    """score(x_t, t, c): the reward of the decoded x̂_0 the denoiser predicts from x_t (SPO's `scorer
    x0`): (x_t − √(1 − ᾱ_t) ε_θ)/√ᾱ_t on DDIM, x_t − σ v_θ on a flow (`policy.x0_at`)."""

    @torch.no_grad()
    def score(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        x0 = m.policy.x0_at(m.unet, x, t, cond)
        rows = len(texts)
        return m.reward(m.pipe.decode(x0), [texts[i % rows] for i in range(x.shape[0])])

    return score


STEPS = {"ddpo": _ddpo, "dpok": _dpok, "d3po": _d3po, "spo": _spo, "awm": _awm}


def critic_step(
    m: Method, final: torch.Tensor, rewards: torch.Tensor, ids: torch.Tensor, cond: torch.Tensor, g: Any
) -> float:
    """One step of SPO's step-aware preference model on the best vs the worst final latent of each
    prompt (`critics.step_preference_loss`: both noised to one random t with one ε); 0 without pairs."""
    from preftune.diffusion.critics import step_preference_loss

    best, worst = [], []
    for pid in ids.unique().tolist():
        rows = (ids == pid).nonzero()[:, 0]
        r = rewards[rows]
        if float(r.max() - r.min()) > 0:
            best.append(int(rows[r.argmax()]))
            worst.append(int(rows[r.argmin()]))
    if not best:
        return 0.0
    loss = step_preference_loss(m.critic, final[best], final[worst], cond[best], m.pipe.scheduler, g)
    m.optimizer.zero_grad(set_to_none=True)  # the policy's gradients are None: only the critic moves
    loss.backward()
    m.optimizer.step()
    m.optimizer.zero_grad(set_to_none=True)
    return float(loss.detach())


def critic_warmup(m: Method, prompts: list[str], steps: int, generator: torch.Generator) -> float:
    """Fit SPO's step-aware model (or DPOK's value) on the current model's samples before training."""
    from preftune.diffusion.online import _value_update
    from preftune.diffusion.policy import sample_trajectory

    loss = 0.0
    for _ in range(steps):
        texts, ids = m.rows(prompts)
        cond = m.pipe.encode(texts)
        traj = sample_trajectory(m.unet, m.policy, cond, m.noise(len(texts), generator), generator)
        rewards = m.reward_fn(texts)(traj.final)
        if m.name == "spo":
            loss = critic_step(m, traj.final, rewards, ids, cond, generator)
        else:
            m.optimizer.zero_grad(set_to_none=True)
            loss = _value_update(m.critic, m.optimizer, m.policy, traj, rewards.float())[1]
            m.optimizer.zero_grad(set_to_none=True)
    return loss
