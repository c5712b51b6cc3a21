"""A trained reward-model folder as a reward function (TRL `reward_funcs` signature).

    r = RewardModelFn("runs/rm/final")
    r(prompts, completions)   # [s(x, y) for each completion], one packed row per run of equal prompts

Prompts and completions are formatted and tokenized as training data is (the folder's tokenizer and
chat template, EOS after the completion), so a completion is scored the way its pairs were trained.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError
from preftune.types import Example


class RewardModelFn:
    """Scores completions with the reward model in `path` (loaded once, eval mode, no gradient)."""

    def __init__(self, path: str | Path, *, batch_prompts: int = 8, heads: int = 1) -> None:
        from preftune.data.formatting import load_tokenizer
        from preftune.reward.scoring import load_scorer

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"reward model folder {folder}: no config.json — give a folder written by "
                "preftune train rm (OUT/final) or AutoModelForSequenceClassification.save_pretrained"
            )
        self.path = folder
        labels = json.loads((folder / "config.json").read_text(encoding="utf-8")).get("id2label")
        if labels is not None and len(labels) != heads:
            raise ConfigError(
                f"reward model folder {folder}: {len(labels)} labels; a reward model has 1 "
                f"(M heads on one trunk: a folder of preftune train rm --heads M, with its ensemble.json)"
            )
        self.model = load_scorer(folder, num_labels=heads)
        self.tokenizer = load_tokenizer(str(folder))
        self.batch_prompts = batch_prompts
        self.__name__ = f"model:{folder}"

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        return [float(v) for v in self.scores(prompts, completions)] if completions else []

    def scores(self, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
        """Scores [N] float32 of the completions ([N, M] for a model with M heads)."""
        from preftune.reward.scoring import branch_scores

        if not completions:
            return torch.zeros(0)
        examples = completion_examples(self.tokenizer, prompts, completions)
        # runs of equal prompts (a group of rollouts) become one packed row each: one prompt pass
        groups: list[tuple[list[int], list[list[int]]]] = []
        for e in examples:
            if groups and groups[-1][0] == e.prompt_ids:
                groups[-1][1].append(e.response_ids[0])
            else:
                groups.append((e.prompt_ids, [e.response_ids[0]]))
        out: list[torch.Tensor] = []
        with torch.no_grad():
            for start in range(0, len(groups), self.batch_prompts):
                part = groups[start : start + self.batch_prompts]
                out.append(branch_scores(self.model, [g[0] for g in part], [g[1] for g in part]))
        return torch.cat(out)


def completion_examples(tokenizer: Any, prompts: Sequence[str], completions: Sequence[str]) -> list[Example]:
    """Each (prompt, completion) as a one-branch example, formatted and tokenized as training data is
    (the chat template, EOS), for a reward model to score."""
    from preftune.data.pipeline import prepare_examples

    records = [{"prompt": p, "completion": c, "label": True} for p, c in zip(prompts, completions)]
    return prepare_examples(
        records, tokenizer=tokenizer, kind="unpaired", use_cache=False, num_proc=1
    ).examples
