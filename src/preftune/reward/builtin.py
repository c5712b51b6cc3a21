"""Built-in reward functions (TRL `reward_funcs` signature)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from preftune.reward.registry import register_reward
from preftune.tasks.arithmetic import verify


@register_reward("arithmetic")
def arithmetic(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """The arithmetic task's verifier: 1.0 when the stated `answer:` is right, else 0.0."""
    return [1.0 if verify(p, c).correct else 0.0 for p, c in zip(prompts, completions)]


@register_reward("arithmetic_steps")
def arithmetic_steps(prompts: Sequence[str], completions: Sequence[str], **kwargs: Any) -> list[float]:
    """Partial credit on the arithmetic task: the fraction of reference lines (steps and the answer
    line) that the response gets right before its first wrong line; 1.0 for a fully right response."""
    out = []
    for p, c in zip(prompts, completions):
        v = verify(p, c)
        out.append(1.0 if v.first_error is None else v.first_error / (v.num_steps + 1))
    return out
