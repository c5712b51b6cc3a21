"""An implicit reward-model folder (`preftune.reward.implicit`) as a reward and as a PRM.

    r = ImplicitRewardFn("runs/irm/final")                      # r_θ(y) = β log π_θ(y)/π_ref(y)
    r = ImplicitRewardFn("runs/irm/final", aggregation="min")   # min_k q_θ at step ends (a PRM)

With aggregation `outcome` (the default of a `train rm` folder) a completion's reward is r_θ(y), the
completion formatted as training data is (chat template, EOS after it), runs of equal prompts one
packed row. With a step aggregation (min, last, sum, mean, prod, steps; `prm:AGG:PATH`), the
completion is split into steps at the folder's separator and each step valued by Proposition 3.1's
q_θ at its end (or, with the folder's `step_value` delta, the step's own q_θ^{e_k} − q_θ^{e_{k−1}}),
then aggregated as a PRM's values are (`preftune.reward.prm_reward.PRMRewardFn`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.reward.prm_reward import PRMRewardFn, split_steps


class ImplicitRewardFn(PRMRewardFn):
    """r_θ or step values of the implicit RM in `path` (loaded once, eval mode, no gradient)."""

    def __init__(self, path: str | Path, *, aggregation: str | None = None, batch_items: int = 16) -> None:
        from preftune.data.formatting import load_tokenizer
        from preftune.reward.implicit import load_implicit
        from preftune.reward.prm import AGGREGATIONS

        folder = Path(path)
        self.irm, self.settings = load_implicit(folder)
        self.aggregation = aggregation or self.settings["aggregation"]
        if self.aggregation not in ("outcome", *AGGREGATIONS):
            raise ConfigError(
                f"unknown aggregation '{self.aggregation}' for an implicit reward model (known: outcome, "
                f"{', '.join(AGGREGATIONS)})"
            )
        self.tokenizer = load_tokenizer(str(folder))
        self.batch_items = batch_items
        self.token_level = self.aggregation == "steps"
        self._cache: dict[tuple[str, str], list[float]] = {}
        self.model = self.irm.policy
        self.__name__ = f"implicit:{self.aggregation}:{folder}"

    def outcome(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """[N] r_θ(y) of the completions, formatted and tokenized as training pairs are."""
        from preftune.reward.implicit_training import example_scores
        from preftune.reward.model_reward import completion_examples

        if not completions:
            return torch.zeros(0)
        examples = completion_examples(self.tokenizer, prompts, completions)
        out = []
        with torch.no_grad():
            for start in range(0, len(examples), self.batch_items):
                out.append(example_scores(self.irm, examples[start : start + self.batch_items]).cpu())
        return torch.cat(out)

    def step_values(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
        """Per completion, the value of each of its steps (empty for a completion without steps)."""
        from preftune.reward.implicit_training import item_step_values
        from preftune.reward.prm_data import PRMItem

        sep = self.settings["separator"]
        steps = [split_steps(c, sep) for c in completions]
        out: list[list[float]] = [[] for _ in completions]
        keep = [i for i, s in enumerate(steps) if s]
        items = [PRMItem(prompts[i], tuple(steps[i]), (), None) for i in keep]
        values = item_step_values(
            self.irm, self.tokenizer, items, sep, self.settings["step_value"], self.batch_items
        )
        for i, v in zip(keep, values):
            out[i] = v
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        if self.aggregation == "outcome":
            return [float(v) for v in self.outcome(prompts, completions)]
        return super().__call__(prompts, completions, **columns)
