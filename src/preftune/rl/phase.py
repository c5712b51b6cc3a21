"""The online phase source: each step samples its own batch from the policy.

    step s: prompts = the seeded batch `batch_indices(..., step=s)` of the prompt data
            rollouts = G samples per prompt (RolloutEngine, seed derived from (seed, phase, s))
            rewards  = reward(prompts, completions, **extra columns)
            advantages = the estimator over the groups (ReMax: minus the greedy response's reward)
            → one `Example` of kind "group" per prompt, K = G branches sharing the prompt

Nothing of a step is stored: the seed of its rollouts depends only on (seed, phase, step) and the
weights are those of the checkpoint, so a resumed run regenerates the same rollouts exactly.
Each example's `meta` carries, per branch, the sampling log-probs (`old_logps`, the π_old of the
ratio), the kept support (`min_logits`), the advantage and the reward; the trainer's policy step
(`preftune.train.policy_step`) reads them.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from preftune.reward.registry import Reward
from preftune.rl.prompts import PromptRow
from preftune.rl.registry import estimate
from preftune.rl.rollout import RolloutEngine
from preftune.rl.sampling import Sampling
from preftune.train.loop import batch_indices
from preftune.types import Example


def generation_seed(seed: int, phase: int, step: int) -> int:
    """The rollout seed of step `step` of `phase`: a function of its arguments only (exact resume)."""
    return (seed * 1_000_003 + phase * 10_007 + step * 7_919 + 1) % (2**63)


@dataclass
class OnlinePhase:
    """A phase whose batches are sampled from the policy (see the module docstring)."""

    index: int
    prompts: list[PromptRow]
    steps: int
    batch_size: int
    seed: int
    reward: Reward
    tokenizer: Any
    estimator: str
    num_generations: int
    sampling: Sampling
    greedy_baseline: bool = False
    verifier: bool = False  # the reward is a 0/1 verifier: report accuracy
    credit: Any = None  # PPO family (estimator gae): value head, token rewards, GAE (rl/ppo.py)
    estimator_hparams: dict[str, Any] = field(default_factory=dict)  # e.g. grpo's scale
    iterations: int = 1  # μ: optimizer steps on each batch of rollouts (TRL's num_iterations)
    _last: tuple[int, list[Example], dict[str, float]] | None = field(default=None, repr=False)
    engine: RolloutEngine | None = None
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def examples(self) -> Sequence[Example]:
        return []  # nothing fixed for a reference to precompute

    def attach(self, model: Any) -> None:
        """Sample from `model` (the policy being trained, in-process)."""
        self.engine = RolloutEngine(model, eos=self.tokenizer)
        if self.credit is not None:
            self.credit.to(next(model.parameters()).device)

    def _texts(self, ids: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(c, skip_special_tokens=True) for c in ids]

    def batch(self, step: int) -> list[Example]:
        """The step's examples: one per prompt, its G samples as branches (sets `metrics`).

        With μ = `iterations` > 1, steps kμ … kμ + μ − 1 share batch k of rollouts, sampled with the
        weights after kμ steps: from the second of them on, π_θ ≠ π_old and the ratio is not 1. A run
        checkpoints only between batches (kμ), so a resumed run samples batch k again, exactly."""
        k = step // self.iterations
        if self._last is not None and self._last[0] == k:
            self.metrics = {**self._last[2], "rollout_s": 0.0}
            return self._last[1]
        examples = self._sample(k)
        self._last = (k, examples, dict(self.metrics))
        return examples

    def _sample(self, k: int) -> list[Example]:
        """Batch `k` of rollouts: prompts, samples, rewards and advantages (sets `metrics`)."""
        assert self.engine is not None, "OnlinePhase.attach(model) first"
        t0 = time.perf_counter()
        idx = batch_indices(len(self.prompts), self.batch_size, seed=self.seed, phase=self.index, step=k)
        rows = [self.prompts[i] for i in idx]
        g = self.num_generations
        self.engine.weight_version = k * self.iterations  # the weights after kμ optimizer steps
        sampling = replace(self.sampling, seed=generation_seed(self.seed, self.index, k))
        out = self.engine.generate([r.ids for r in rows], g, sampling)
        completions = out.completions()
        rewards = self.reward(
            [r.text for r in rows for _ in range(g)], self._texts(completions), **_columns(rows, g)
        )
        extra: dict[str, Any] = {}
        if self.greedy_baseline:  # ReMax: the reward of each prompt's greedy response is its baseline
            greedy = self.engine.generate([r.ids for r in rows], 1, replace(sampling, temperature=0.0))
            extra["baseline_rewards"] = self.reward(
                [r.text for r in rows], self._texts(greedy.completions()), **_columns(rows, 1)
            )
        if self.credit is not None:  # PPO family: GAE over token rewards with the value head
            est = self.credit(self.engine.model, [r.ids for r in rows], out, rewards, sampling.seed)
        else:
            est = estimate(self.estimator, rewards, out.prompt_index, **extra, **self.estimator_hparams)
        adv = est.advantages.float()
        per_token = getattr(est, "meta", {})  # the credit's values and returns [N, T]
        examples = []
        for p, r in enumerate(rows):
            part = slice(p * g, (p + 1) * g)
            branch = completions[part]
            width = max(len(c) for c in branch)
            a = adv[part] if adv.dim() == 1 else adv[part, :width]
            meta = {
                "old_logps": out.logps[part, :width],
                "min_logits": out.min_logits[part, :width],
                "advantages": a,
                "rewards": rewards[part].float(),
                "temperature": sampling.temperature,
                "max_len": sampling.max_new_tokens,
                **{k: v[part, :width] for k, v in per_token.items()},
            }
            examples.append(Example(r.ids, branch, kind="group", source_row=r.row, meta=meta))
        lengths = out.mask.sum(dim=1).float()
        self.metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "zero_signal_fraction": est.metrics["zero_signal_fraction"],
            "completion_length": float(lengths.mean()),
            "clipped_fraction": float((~out.finished).float().mean()),
            "rollout_s": time.perf_counter() - t0,
        }
        if self.verifier:
            self.metrics["accuracy"] = float((rewards >= 1.0).double().mean())
        if self.credit is not None:
            self.metrics.update({k: v for k, v in est.metrics.items() if k != "zero_signal_fraction"})
        for name, values in self.reward.last_values.items():
            if len(self.reward.terms) > 1:
                self.metrics[f"reward/{name}"] = float(torch.tensor(values).nanmean())
        return examples


def _columns(rows: list[PromptRow], repeat: int) -> dict[str, list[Any]]:
    """The prompts' extra columns, each value repeated for the prompt's samples (None where absent)."""
    keys = sorted({k for r in rows for k in r.columns})
    return {k: [r.columns.get(k) for r in rows for _ in range(repeat)] for k in keys}


def online_phase(config: Any, tokenizer: Any) -> OnlinePhase:
    """The online phase of `config` (an online method): its prompts, reward, estimator and sampling.

    Steps: `max_steps`, else `epochs` passes over the prompts (batch_size prompts a batch of rollouts,
    `num_iterations` steps each)."""
    import math

    from preftune.online_methods import DEFAULT_COMPLETION_LENGTH
    from preftune.online_options import resolve_online
    from preftune.reward import load_reward
    from preftune.rl.ppo import token_credit
    from preftune.rl.prompts import load_prompts

    prompts = load_prompts(
        config.prompts,
        tokenizer,
        split=config.split,
        chat_template=config.chat_template,
        max_prompt_length=config.max_prompt_length,
    )
    online = resolve_online(config.method, config.estimator, config.objective, config.hparams)
    batches = max(1, math.ceil(config.epochs * math.ceil(len(prompts) / config.batch_size)))
    steps = config.max_steps or batches * config.num_iterations
    sampling = Sampling(
        max_new_tokens=config.max_completion_length or DEFAULT_COMPLETION_LENGTH,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
    )
    return OnlinePhase(
        0, prompts, steps, config.batch_size, config.seed, load_reward(config.reward), tokenizer,
        online.estimator, config.num_generations, sampling, greedy_baseline=online.greedy_baseline,
        verifier=config.reward.strip() == "arithmetic", estimator_hparams=online.estimator_hparams,
        iterations=config.num_iterations, credit=token_credit(config, online.estimator),
    )  # fmt: skip
