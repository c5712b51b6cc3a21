"""The online phase source: each step samples its own batch from the policy.

    step s: prompts = the seeded batch `batch_indices(..., step=s)` of the prompt data
            rollouts = G samples per prompt (RolloutEngine, seed derived from (seed, phase, s))
            rewards  = reward(prompts, completions, **extra columns)
            advantages = the estimator over the groups (ReMax: minus the greedy response's reward)
            → one `Example` of kind "group" per prompt, K = G branches sharing the prompt

The sampler (`preftune.rl.samplers`, default `uniform`: exactly the above) may draw more — other
prompts, several rounds, a probe stage — and keep only some groups; every engine call of the step
gets a seed derived from (seed, phase, s) and its call number. Nothing of a step is stored: the
weights are those of the checkpoint and a stateful sampler's state (VADE's posterior) is saved with
it, so a resumed run regenerates the same rollouts exactly.
Each example's `meta` carries, per branch, the sampling log-probs (`old_logps`, the π_old of the
ratio), the kept support (`min_logits`), the advantage and the reward; the trainer's policy step
(`preftune.train.policy_step`) reads them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.reward.registry import Reward
from preftune.rl.draws import Drawn, StepSource, as_rollouts, columns
from preftune.rl.prompts import PromptRow, preference_columns_note
from preftune.rl.registry import estimate
from preftune.rl.registry import get as get_estimator
from preftune.rl.rollout import RolloutEngine
from preftune.rl.samplers import Sampler, make_sampler
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
    sampler: Sampler | None = None  # which prompts, how many samples, which groups (default uniform)
    metrics: dict[str, float] = field(default_factory=dict)
    builder: str = ""  # how scored groups become offline-kind examples (preftune.rl.builders); "": groups
    builder_hparams: dict[str, Any] = field(default_factory=dict)
    reference: Any = None  # the reference provider, for builders that sample from it (XPO)

    @property
    def examples(self) -> Sequence[Example]:
        return []  # nothing fixed for a reference to precompute

    def __post_init__(self) -> None:
        if self.sampler is None:
            self.sampler = make_sampler("uniform", prompts=len(self.prompts))

    def attach(self, model: Any) -> None:
        """Sample from `model` (the policy being trained, in-process)."""
        self.engine = RolloutEngine(model, eos=self.tokenizer)
        if self.credit is not None:
            self.credit.to(next(model.parameters()).device)

    def _texts(self, ids: list[list[int]]) -> list[str]:
        return [self.tokenizer.decode(c, skip_special_tokens=True) for c in ids]

    def attach_reference(self, provider: Any) -> None:
        """The phase's reference (a builder that samples from π_ref, XPO, reads it)."""
        self.reference = provider

    def batch(self, step: int) -> list[Example]:
        """The step's examples: one per kept group, its samples as branches (sets `metrics`).

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
        """Batch `k` of rollouts: the sampler's groups, rewards and advantages (sets `metrics`)."""
        assert self.engine is not None, "OnlinePhase.attach(model) first"
        t0 = time.perf_counter()
        idx = batch_indices(len(self.prompts), self.batch_size, seed=self.seed, phase=self.index, step=k)
        self.engine.weight_version = k * self.iterations  # the weights after kμ optimizer steps
        seed = generation_seed(self.seed, self.index, k)
        sampling = replace(self.sampling, seed=seed)
        source = StepSource(self.engine, self.prompts, self.reward, self.tokenizer, sampling, idx, seed + 1)
        assert self.sampler is not None
        selection = self.sampler.select(source, self.batch_size, self.num_generations)
        drawn, groups = selection.drawn, selection.groups
        rows = [r for g in groups for r in g]
        rewards = drawn.rewards[rows]
        if self.builder:  # scored samples → offline-kind examples (preftune.rl.builders)
            from preftune.rl.builders import build_examples

            prompt_rows = [self.prompts[drawn.prompt[g[0]]] for g in groups]
            built, extra = build_examples(
                self, prompt_rows, [drawn.completions[r] for r in rows], rewards, sampling
            )
            flat = sum(float(drawn.rewards[g].max() == drawn.rewards[g].min()) for g in groups)
            self._metrics(drawn, rows, flat / max(len(groups), 1), t0)
            self.metrics.update({**extra, **selection.metrics})
            return built
        group_of = torch.tensor([i for i, g in enumerate(groups) for _ in g])
        if self.credit is not None:  # PPO family: GAE over token rewards with the value head
            out = as_rollouts(drawn, groups, sampling.temperature, k * self.iterations)
            prompt_ids = [self.prompts[drawn.prompt[g[0]]].ids for g in groups]
            steps = self._step_rewards(drawn, rows)  # a PRM's step values at step ends (prm:steps:…)
            est = self.credit(self.engine.model, prompt_ids, out, rewards, sampling.seed, steps)
        else:
            inputs = self._inputs(drawn, groups, sampling)
            est = estimate(self.estimator, rewards, group_of, **inputs, **self.estimator_hparams)
        adv = est.advantages.float()
        per_token = getattr(est, "meta", {})  # the credit's values and returns [N, T]
        examples, start = [], 0
        for g in groups:
            part = slice(start, start + len(g))
            extra = {k: v[part] for k, v in per_token.items()}
            examples.append(self._example(drawn, g, adv[part], sampling, extra))
            start += len(g)
        self._metrics(drawn, rows, est.metrics["zero_signal_fraction"], t0)
        if self.credit is not None:
            self.metrics.update({k: v for k, v in est.metrics.items() if k != "zero_signal_fraction"})
        self.metrics.update(selection.metrics)
        return examples

    def _step_rewards(self, drawn: Drawn, rows: list[int]) -> torch.Tensor | None:
        """[N, T] the reward's per-token terms on `rows`' sampled tokens (`Reward.token_rewards`), None
        when it has none."""
        if not any(getattr(t.fn, "token_level", False) for t in self.reward.terms):
            return None
        ids = [drawn.completions[r] for r in rows]
        prompts = [self.prompts[drawn.prompt[r]].text for r in rows]
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in ids]
        return self.reward.token_rewards(prompts, texts, ids, self.tokenizer)

    def _inputs(self, drawn: Drawn, groups: list[list[int]], sampling: Sampling) -> dict[str, Any]:
        """The estimator's extra inputs: ReMax's greedy-response rewards; the pools of the kept groups'
        prompts (every sample drawn for them this step) for estimators that read `pool_rewards`."""
        extra: dict[str, Any] = {}
        prompts = [drawn.prompt[g[0]] for g in groups]
        if self.greedy_baseline:  # ReMax: the reward of each prompt's greedy response is its baseline
            assert self.engine is not None
            rows = [self.prompts[i] for i in prompts]
            greedy = self.engine.generate([r.ids for r in rows], 1, replace(sampling, temperature=0.0))
            extra["baseline_rewards"] = self.reward(
                [r.text for r in rows], self._texts(greedy.completions()), **columns(rows, 1)
            )
        if "pool_rewards" in get_estimator(self.estimator).inputs:
            pools = [drawn.rows_of(p) for p in prompts]
            extra["pool_rewards"] = torch.cat([drawn.rewards[pool] for pool in pools])
            extra["pool_groups"] = torch.tensor([i for i, pool in enumerate(pools) for _ in pool])
        return extra

    def _example(
        self, drawn: Drawn, rows: list[int], adv: torch.Tensor, sampling: Sampling, extra: dict[str, Any]
    ) -> Example:
        """One kept group as an example of kind "group": the prompt and its completions as branches."""
        branch = [drawn.completions[r] for r in rows]
        width = max(len(c) for c in branch)

        def pad(parts: list[torch.Tensor], fill: float) -> torch.Tensor:
            return torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=fill) for x in parts])

        meta = {
            "old_logps": pad([drawn.logps[r] for r in rows], 0.0),
            "min_logits": pad([drawn.min_logits[r] for r in rows], float("-inf")),
            "advantages": adv if adv.dim() == 1 else adv[:, :width],
            "rewards": drawn.rewards[rows].float(),
            "temperature": sampling.temperature,
            "max_len": sampling.max_new_tokens,
            **{k: v[:, :width] for k, v in extra.items()},
        }
        row = self.prompts[drawn.prompt[rows[0]]]
        return Example(row.ids, branch, kind="group", source_row=row.row, meta=meta)

    def _metrics(self, drawn: Drawn, rows: list[int], zero_signal: float, t0: float) -> None:
        rewards = drawn.rewards[rows]
        lengths = torch.tensor([float(len(drawn.completions[r])) for r in rows])
        self.metrics = {
            "reward": float(rewards.mean()),
            "reward_std": float(rewards.std(unbiased=False)),
            "zero_signal_fraction": zero_signal,
            "completion_length": float(lengths.mean()),
            "clipped_fraction": float(1.0 - torch.tensor([drawn.finished[r] for r in rows]).float().mean()),
            "completions": float(len(drawn)),
            "rollout_s": time.perf_counter() - t0,
        }
        if self.verifier:
            self.metrics["accuracy"] = float((rewards >= 1.0).double().mean())
        for name, values in self.reward.last_values.items():
            if len(self.reward.terms) > 1:
                self.metrics[f"reward/{name}"] = float(torch.tensor(values).nanmean())


def run_prompts(config: Any, source: str, tokenizer: Any, split: str | None = None) -> list[PromptRow]:
    """Prompt rows of `source` read as the online run of `config` reads its prompts (its chat template,
    its prompt-length limit): training prompts, held-out ones, and those `preftune eval --prompts` scores."""
    from preftune.rl.prompts import load_prompts

    return load_prompts(
        source,
        tokenizer,
        split=split,
        chat_template=config.chat_template,
        max_prompt_length=config.max_prompt_length,
    )


def held_out_prompts(config: Any, tokenizer: Any) -> list[PromptRow]:
    """An online run's `eval_data` (`eval_split`): held-out prompts, read as the training prompts are;
    [] without it."""
    return run_prompts(config, config.eval_data, tokenizer, config.eval_split) if config.eval_data else []


def held_out_reward(model: Any, phase: OnlinePhase, rows: list[PromptRow]) -> dict[str, float]:
    """The mean reward of `model`'s greedy responses to the held-out prompt `rows` under the phase's
    reward and generation budget (logged as `split: eval`, `reward`; `accuracy` too for the 0/1
    verifier): what `preftune eval RUN --prompts` measures at the end, during training."""
    from preftune.eval.heldout_reward import mean_rewards, responses

    texts = responses(
        model, phase.tokenizer, rows, num_samples=1, max_new_tokens=phase.sampling.max_new_tokens,
        temperature=0.0, seed=0,
    )  # fmt: skip
    mean = float(mean_rewards(phase.reward, rows, texts, 1).mean())
    return {"reward": mean, **({"accuracy": mean} if phase.verifier else {}), "prompts": float(len(rows))}


def _check_verifier_prompts(reward: Reward, config: Any, prompts: Sequence[PromptRow]) -> None:
    """The built-in verifiers read every prompt as `A OP B=`: a prompt they cannot read is named with
    its file and row now, before the model loads, not at the first step's scoring."""
    from preftune.errors import DataError
    from preftune.tasks.arithmetic import parse_prompt

    if not any(term.name in ("arithmetic", "arithmetic_steps") for term in reward.terms):
        return
    for p in prompts:
        try:
            parse_prompt(p.text)
        except DataError as err:
            raise DataError(
                err.problem, path=str(config.prompts), row=p.row, field="prompt", fix=err.fix
            ) from None


def online_phase(config: Any, tokenizer: Any) -> OnlinePhase:
    """The online phase of `config` (an online method): its prompts, reward, estimator and sampling.

    Steps: `max_steps`, else `epochs` passes over the prompts (batch_size prompts a batch of rollouts,
    `num_iterations` steps each)."""
    import math

    from preftune.online_methods import DEFAULT_COMPLETION_LENGTH, preset_sampler
    from preftune.online_options import resolve_online
    from preftune.reward import load_reward
    from preftune.rl.ppo import token_credit

    prompts = run_prompts(config, config.prompts, tokenizer, config.split)
    note = preference_columns_note(prompts, str(config.prompts), config.method)
    if note:  # a pairs file is a fine prompt source, but its responses are not trained on
        logging.getLogger("preftune.rl").warning(note)
    reward = load_reward(config.reward)
    _check_verifier_prompts(reward, config, prompts)
    if config.batch_size > len(prompts):
        raise ConfigError(
            f"--batch-size {config.batch_size} prompts per step is more than the {len(prompts)} prompts of "
            f"{config.prompts}: every step would sample those {len(prompts)}, not {config.batch_size} — give "
            f"--batch-size {len(prompts)} or less, or more prompts"
        )
    from preftune.rl.builders import builder_settings

    builder, builder_hparams = builder_settings(config)  # a builder's objective is an offline loss
    online = (
        None if builder else resolve_online(config.method, config.estimator, config.objective, config.hparams)
    )
    sampler_name, sampler_args = preset_sampler(config.method, config.sampler, config.sampler_args)
    batches = max(1, math.ceil(config.epochs * math.ceil(len(prompts) / config.batch_size)))
    steps = config.max_steps or batches * config.num_iterations
    sampling = Sampling(
        max_new_tokens=config.max_completion_length or DEFAULT_COMPLETION_LENGTH,
        temperature=config.temperature,
        top_k=config.top_k,
        top_p=config.top_p,
    )
    return OnlinePhase(
        0, prompts, steps, config.batch_size, config.seed, reward, tokenizer,
        online.estimator if online else "", config.num_generations, sampling,
        greedy_baseline=bool(online and online.greedy_baseline), verifier=config.reward.strip() == "arithmetic",
        estimator_hparams=online.estimator_hparams if online else {}, iterations=config.num_iterations,
        credit=token_credit(config, online.estimator) if online else None,
        sampler=make_sampler(sampler_name, sampler_args, prompts=len(prompts)), builder=builder,
        builder_hparams=builder_hparams,
    )  # fmt: skip
