"""Held-out reward of a policy run: the final model's responses to held-out prompts scored by a reward,
against the starting model's responses to the same prompts (`preftune eval RUN --prompts FILE`).

    gain = mean_i (r̄_after(x_i) − r̄_before(x_i)),   stderr = std_i(r̄_after − r̄_before) / √P

r̄(x_i) is the mean reward of the `num_samples` responses to prompt i (one greedy response at
temperature 0, the default); the gain is paired by prompt — and by sampling seed when sampling — so
the prompts' own difficulty cancels from its standard error. This is the measure the online methods
are trained to raise (docs/online.md), on prompts they were not trained on.
"""

from __future__ import annotations

import math
from typing import Any

import torch


def responses(
    model: torch.nn.Module, tokenizer: Any, rows: list[Any], *, num_samples: int, **sampling: Any
) -> list[str]:
    """`num_samples` decoded responses per prompt row, prompt-major ([row][sample] flattened)."""
    from preftune.generation import generate

    ids = generate(model, tokenizer, [r.ids for r in rows], num_samples=num_samples, **sampling)
    return [str(tokenizer.decode(s, skip_special_tokens=True)) for out in ids for s in out]


def mean_rewards(reward: Any, rows: list[Any], texts: list[str], num_samples: int) -> torch.Tensor:
    """[P] the mean reward of each prompt's responses; the reward gets every extra column of the rows."""
    prompts = [r.text for r in rows for _ in range(num_samples)]
    names = sorted({k for r in rows for k in r.columns})
    columns = {k: [r.columns.get(k) for r in rows for _ in range(num_samples)] for k in names}
    values = torch.as_tensor(reward(prompts, texts, **columns), dtype=torch.float64)
    return values.view(len(rows), num_samples).mean(dim=1)


def heldout_reward(
    policy: torch.nn.Module,
    start: torch.nn.Module,
    tokenizer: Any,
    rows: list[Any],
    reward: Any,
    *,
    num_samples: int = 1,
    temperature: float = 0.0,
    max_new_tokens: int = 128,
    seed: int = 0,
) -> dict[str, float]:
    """Mean held-out reward before (`start`) and after (`policy`), the paired gain and its standard
    error, over the prompt `rows` (`preftune.rl.prompts.PromptRow`s)."""
    if num_samples > 1 and temperature == 0:
        from preftune.errors import ConfigError

        raise ConfigError("greedy decoding (temperature 0) gives one response: use --num-samples 1")
    sampling = {"max_new_tokens": max_new_tokens, "temperature": temperature, "seed": seed}
    before = mean_rewards(
        reward, rows, responses(start, tokenizer, rows, num_samples=num_samples, **sampling), num_samples
    )
    after = mean_rewards(
        reward, rows, responses(policy, tokenizer, rows, num_samples=num_samples, **sampling), num_samples
    )
    diff = after - before
    spread = float(diff.std(unbiased=True)) if len(rows) > 1 else math.nan
    return {
        "reward/before": float(before.mean()),
        "reward/after": float(after.mean()),
        "reward/gain": float(diff.mean()),
        "reward/gain_stderr": spread / math.sqrt(len(rows)),
        "reward/prompts": float(len(rows)),
        "reward/samples_per_prompt": float(num_samples),
    }
