"""What a sampler may ask for within one online step: samples of chosen prompts, more prompts, seeded
randomness, and (GVM) per-sample gradient norms of the LM head.

    drawn = source.draw([3, 7], n=8)      # 8 completions of prompts 3 and 7, rewarded (a `Drawn`)
    source.batch                          # the step's seeded prompts (what `uniform` trains on)
    source.more(4)                        # 4 further prompts of this step (refills), never repeated
    source.rng                            # numpy Generator seeded by (seed, phase, step)

Every call is a function of (seed, phase, step) and the call order, so a resumed run that restores
the sampler's state draws the same samples again.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from preftune.reward.registry import Reward
from preftune.rl.prompts import PromptRow
from preftune.rl.rollout import RolloutEngine, Rollouts
from preftune.rl.sampling import Sampling


@dataclass
class Drawn:
    """Completions drawn in one step (every round), one entry per completion.

    prompt: index into the phase's prompt list; logps / min_logits: [T_i] (the completion's length);
    rewards: [N] float64; finished: ended with EOS."""

    prompt: list[int] = field(default_factory=list)
    completions: list[list[int]] = field(default_factory=list)
    logps: list[torch.Tensor] = field(default_factory=list)
    min_logits: list[torch.Tensor] = field(default_factory=list)
    rewards: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.float64))
    finished: list[bool] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.prompt)

    def extend(self, other: Drawn) -> range:
        """Append `other`'s rows; returns their row numbers here."""
        start = len(self)
        self.prompt += other.prompt
        self.completions += other.completions
        self.logps += other.logps
        self.min_logits += other.min_logits
        self.rewards = torch.cat([self.rewards, other.rewards.to(torch.float64)])
        self.finished += other.finished
        return range(start, len(self))

    def rows_of(self, prompt: int) -> list[int]:
        """Every row drawn for `prompt` (its pool)."""
        return [i for i, p in enumerate(self.prompt) if p == prompt]


def as_rollouts(drawn: Drawn, groups: list[list[int]], temperature: float, version: int) -> Rollouts:
    """The kept groups as engine `Rollouts` (row r = sample r % n of group r // n), for consumers of
    that layout (the PPO family's credit); every group must hold the same number n of samples."""
    from preftune.errors import ConfigError

    if len({len(g) for g in groups}) != 1:
        raise ConfigError("the PPO family (estimator gae) needs groups of equal size: use sampler uniform")
    rows = [r for g in groups for r in g]
    width = max(len(drawn.completions[r]) for r in rows)

    def pad(parts: list[torch.Tensor], fill: float) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(x, (0, width - len(x)), value=fill) for x in parts])

    lengths = torch.tensor([len(drawn.completions[r]) for r in rows])
    return Rollouts(
        completion_ids=pad([torch.tensor(drawn.completions[r], dtype=torch.long) for r in rows], 0),
        mask=torch.arange(width)[None, :] < lengths[:, None],
        logps=pad([drawn.logps[r] for r in rows], 0.0),
        min_logits=pad([drawn.min_logits[r] for r in rows], float("-inf")),
        prompt_index=torch.arange(len(groups)).repeat_interleave(len(groups[0])),
        finished=torch.tensor([drawn.finished[r] for r in rows]),
        weight_version=version,
        temperature=temperature,
    )


def columns(rows: list[PromptRow], repeat: int) -> dict[str, list[Any]]:
    """The prompts' extra columns, each value repeated for the prompt's samples (None where absent)."""
    keys = sorted({k for r in rows for k in r.columns})
    return {k: [r.columns.get(k) for r in rows for _ in range(repeat)] for k in keys}


class StepSource:
    """The draws of one step of an online phase (see the module docstring)."""

    def __init__(
        self,
        engine: RolloutEngine,
        prompts: list[PromptRow],
        reward: Reward,
        tokenizer: Any,
        sampling: Sampling,
        batch: list[int],
        rng_seed: int,
    ) -> None:
        self.engine, self.prompts, self.reward, self.tokenizer = engine, prompts, reward, tokenizer
        self.sampling = sampling
        self.batch = list(batch)
        self.rng = np.random.default_rng(rng_seed)
        self.calls = 0  # draws so far: each gets its own generation seed
        self.taken: set[int] = set(batch)
        self._order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(rng_seed)).tolist()

    def more(self, k: int) -> list[int]:
        """Up to `k` prompts not yet used this step, in a seeded order of the step."""
        out = [i for i in self._order if i not in self.taken][: max(k, 0)]
        self.taken.update(out)
        return out

    def draw(self, prompts: list[int], n: int) -> Drawn:
        """`n` rewarded completions of each of `prompts` (rows grouped by prompt)."""
        if not prompts or n < 1:
            return Drawn()
        base = self.sampling.seed or 0  # the first call keeps the step's seed (the uniform sampler's)
        seed = (base + 104_729 * self.calls) % 2**63
        self.calls += 1
        rows = [self.prompts[i] for i in prompts]
        out = self.engine.generate([r.ids for r in rows], n, replace(self.sampling, seed=seed))
        completions = out.completions()
        texts = [self.tokenizer.decode(c, skip_special_tokens=True) for c in completions]
        rewards = self.reward([r.text for r in rows for _ in range(n)], texts, **columns(rows, n))
        lengths = [len(c) for c in completions]
        return Drawn(
            prompt=[i for i in prompts for _ in range(n)],
            completions=completions,
            logps=[out.logps[j, :t] for j, t in enumerate(lengths)],
            min_logits=[out.min_logits[j, :t] for j, t in enumerate(lengths)],
            rewards=rewards.to(torch.float64),
            finished=out.finished.tolist(),
        )

    def draw_each(self, counts: dict[int, int]) -> Drawn:
        """counts[prompt] completions of each prompt (one engine call per distinct count)."""
        drawn = Drawn()
        for n in sorted({c for c in counts.values() if c > 0}):
            drawn.extend(self.draw([p for p, c in counts.items() if c == n], n))
        return drawn

    def head_grad_norms(self, drawn: Drawn, rows: list[int]) -> torch.Tensor:
        """‖∇_W log π(y|x)‖ per row (see `head_gradient_norms`) at the sampling temperature."""
        model = self.engine.model
        ids = [self.prompts[drawn.prompt[r]].ids for r in rows]
        return head_gradient_norms(
            model, ids, [drawn.completions[r] for r in rows], self.sampling.temperature
        )


@torch.no_grad()
def head_gradient_norms(
    model: Any, prompts: list[list[int]], completions: list[list[int]], temperature: float = 1.0
) -> torch.Tensor:
    """[N] Frobenius norms of ∇_W log π(y|x) for the output-embedding weight W only (GVM's G_i).

    With h_t the final hidden state before the head and p_t = softmax(W h_t / τ),
    ∇_W log π(y|x) = (1/τ) Σ_t (e_{y_t} − p_t) h_tᵀ, so its squared norm is
    (1/τ²) Σ_{t,t'} (g_t·g_t')(h_t·h_t') with g_t = e_{y_t} − p_t: two [T, T] Gram matrices, no
    [V, H] gradient per sample. The full-vocabulary softmax is used (top-k / top-p cuts ignored)."""
    head = model.get_output_embeddings()
    device = head.weight.device
    tau = temperature if temperature > 0 else 1.0
    was_training = model.training
    model.eval()
    out = torch.zeros(len(prompts), dtype=torch.float64)
    try:
        for i, (p, c) in enumerate(zip(prompts, completions)):
            if not c:
                continue
            ids = torch.tensor([p + c[:-1]], device=device)
            hidden = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0, len(p) - 1 :]
            h = hidden.double()
            probs = torch.softmax(head(hidden).double() / tau, dim=-1)
            g = -probs
            g[torch.arange(len(c)), torch.tensor(c, device=device)] += 1.0
            out[i] = ((g @ g.t()) * (h @ h.t())).sum().clamp(min=0).sqrt().cpu() / tau
    finally:
        model.train(was_training)
    return out
