"""A PRM folder as a reward: step values → one reward per completion, or token rewards at step ends;
and Step-DPO pairs located by a PRM instead of a verifier.

    r = PRMRewardFn("runs/prm/final", aggregation="min")
    r(prompts, completions)                  # [agg_k v_k] per completion (the `--reward` interface)
    r.token_rewards(prompts, completions, policy_tokenizer)   # v_k on the token that ends step k
    r.token_rewards(prompts, completions, policy_tokenizer, token_ids=sampled_ids)   # the same, on
                                             # the tokens the policy sampled

v_k is the step value: σ(s_k) for a `prm_bce` model (P(step good)), s_k for a `pav_mse` model. A
completion is split into steps at the folder's separator (newline by default) and each step scored
as in training. Aggregations: `min` (Wang et al. 2024, Math-Shepherd: a solution is as good as its
weakest step), `last`, `sum` (Setlur et al. 2024 sum the advantages of a PAV over steps), `mean`,
`prod` (Lightman et al. 2023), and `steps`: every step's value a reward of its own at the step's
end (Wang et al. 2024, Math-Shepherd §3.4, step-by-step PPO: "the reward model provides a reward at
the end of each reasoning step"), which the PPO family's GAE takes per token (`rl.ppo.TokenCredit`);
as one number per completion it is their sum, the undiscounted return.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError


def split_steps(completion: str, separator: str = "\n") -> list[str]:
    """The steps of a completion: split at `separator`, empty pieces dropped."""
    return [s for s in completion.split(separator) if s.strip()] if separator else [completion]


class PRMRewardFn:
    """Step values of completions under the PRM in `path` (loaded once, eval mode, no gradient)."""

    def __init__(self, path: str | Path, *, aggregation: str | None = None, batch_items: int = 16) -> None:
        from preftune.data.formatting import load_tokenizer
        from preftune.reward.prm import AGGREGATIONS
        from preftune.reward.processbench import read_prm_settings
        from preftune.reward.scoring import load_scorer

        folder = Path(path)
        if not (folder / "config.json").is_file():
            raise ConfigError(
                f"process reward model folder {folder}: no config.json — give the OUT/final folder of "
                "preftune train prm"
            )
        self.settings = read_prm_settings(folder)
        self.aggregation = aggregation or self.settings["aggregation"]
        if self.aggregation not in AGGREGATIONS:
            raise ConfigError(
                f"unknown step aggregation '{self.aggregation}' (known: {', '.join(AGGREGATIONS)})"
            )
        self.model = load_scorer(folder)
        self.tokenizer = load_tokenizer(str(folder))
        self.batch_items = batch_items
        self.token_level = self.aggregation == "steps"
        """Rewards per step-end token (`token_rewards`) rather than one per completion."""
        self._cache: dict[tuple[str, str], list[float]] = {}
        self.__name__ = f"prm:{self.aggregation}:{folder}"

    def step_values(self, prompts: Sequence[str], completions: Sequence[str]) -> list[list[float]]:
        """Per completion, the value of each of its steps (empty for a completion without steps)."""
        from preftune.reward.prm import score_encoded, step_probabilities
        from preftune.reward.prm_data import encode_steps

        sep = self.settings["separator"]
        steps = [split_steps(c, sep) for c in completions]
        out: list[list[float]] = [list(self._cache.get((p, c), [])) for p, c in zip(prompts, completions)]
        keep = [i for i, s in enumerate(steps) if s and (prompts[i], completions[i]) not in self._cache]
        if len(self._cache) + len(keep) > 4096:  # the values of the last draws (a step scores them twice)
            self._cache.clear()
        with torch.no_grad():
            for start in range(0, len(keep), self.batch_items):
                part = keep[start : start + self.batch_items]
                enc = [encode_steps(self.tokenizer, prompts[i], steps[i], sep) for i in part]
                for i, s in zip(part, score_encoded(self.model, enc)):
                    out[i] = step_probabilities(s, self.settings["loss"]).tolist()
                    self._cache[(prompts[i], completions[i])] = list(out[i])
        return out

    def __call__(self, prompts: Sequence[str], completions: Sequence[str], **columns: Any) -> list[float]:
        """One reward per completion: the aggregation of its step values (0 for no steps)."""
        from preftune.reward.prm import aggregate_steps

        values = self.step_values(prompts, completions)
        return [
            float(aggregate_steps(torch.tensor(v, dtype=torch.float64), self.aggregation)) for v in values
        ]

    def token_rewards(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        tokenizer: Any,
        token_ids: Sequence[Sequence[int]] | None = None,
    ) -> list[list[float]]:
        """Per completion, a reward per token: step k's value on the token holding the step's last
        character, 0 elsewhere; with aggregation `last` only the final step's value, on its token (a
        process reward shaped as a sparse outcome). The tokens are `token_ids[i]` (what the policy
        sampled; `completions[i]` is their decoded text) or, without them, `tokenizer`'s encoding of
        the text (no special tokens)."""
        values = self.step_values(prompts, completions)
        sep = self.settings["separator"]
        out: list[list[float]] = []
        for i, (text, vals) in enumerate(zip(completions, values)):
            if token_ids is not None:
                ends = token_char_ends(tokenizer, token_ids[i])
            else:
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                ends = [b for _, b in enc["offset_mapping"]]
            pairs = list(zip(step_end_chars(text, sep), vals))
            out.append(place_at_chars(pairs[-1:] if self.aggregation == "last" else pairs, ends))
        return out


def token_char_ends(tokenizer: Any, ids: Sequence[int]) -> list[int]:
    """For each token t of `ids`, the length of the text decoded from ids[: t + 1] (special tokens
    skipped): token t holds the characters from the previous token's end up to its own."""
    return [len(tokenizer.decode(list(ids[: t + 1]), skip_special_tokens=True)) for t in range(len(ids))]


def place_at_chars(pairs: Sequence[tuple[int, float]], ends: Sequence[int]) -> list[float]:
    """A value per token (0 by default): each (character index c, v) adds v on the first token whose
    end lies past c, the token that holds character c (`ends` from `token_char_ends` or a tokenizer's
    offsets); a character past the last token's end places nothing."""
    rewards = [0.0] * len(ends)
    for c, v in pairs:
        t = next((j for j, e in enumerate(ends) if e > c), None)
        if t is not None:
            rewards[t] += v
    return rewards


def step_end_chars(completion: str, separator: str = "\n") -> list[int]:
    """Character index of the last character of each step of `split_steps(completion, separator)`."""
    ends, pos = [], 0
    for piece in completion.split(separator) if separator else [completion]:
        if piece.strip():
            ends.append(pos + len(piece) - 1)
        pos += len(piece) + len(separator)
    return ends


def step_records_from_values(prompts: Sequence[str], samples: Sequence[Sequence[str]],
                             values: Sequence[Sequence[Sequence[float]]], threshold: float,
                             separator: str = "\n") -> list[dict[str, Any]]:  # fmt: skip
    """Step-DPO records (Lai et al. 2024) located by step values instead of a verifier.

    For each sample of a prompt whose first step below `threshold` is k (`values[i][j]` are sample j's
    step values): the correct alternatives for step k are the k-th steps of the prompt's other samples
    that share its first k steps and whose step k is at or above the threshold. One record per
    sample with at least one alternative: `prompt`, `steps`, `first_error` k, `correct_steps`.
    """
    from preftune.reward.processbench import first_below

    records: list[dict[str, Any]] = []
    for prompt, group, vals in zip(prompts, samples, values):
        steps = [split_steps(s, separator) for s in group]
        for j, (ss, vs) in enumerate(zip(steps, vals)):
            k = first_below(vs, threshold)
            if k < 0:
                continue
            good = [
                other[k]
                for o, (other, ov) in enumerate(zip(steps, vals))
                if o != j
                and len(other) > k
                and other[:k] == ss[:k]
                and ov[k] >= threshold
                and other[k] != ss[k]
            ]
            if good:
                records.append({"prompt": prompt, "steps": ss, "first_error": k,
                                "correct_steps": list(dict.fromkeys(good))})  # fmt: skip
    return records


def prm_step_pairs(prm: PRMRewardFn, prompts: Sequence[str], samples: Sequence[Sequence[str]],
                   threshold: float = 0.5) -> list[dict[str, Any]]:  # fmt: skip
    """Step-DPO pairs (`preftune.data.transforms.step_dpo_pairs`) from samples [prompt][j], the wrong
    step and its correct alternatives located by the PRM `prm` (`step_records_from_values`)."""
    from preftune.data.transforms import step_dpo_pairs

    sep = prm.settings["separator"]
    flat_p = [p for p, g in zip(prompts, samples) for _ in g]
    flat_v = prm.step_values(flat_p, [s for g in samples for s in g])
    values, pos = [], 0
    for g in samples:
        values.append(flat_v[pos : pos + len(g)])
        pos += len(g)
    records = step_records_from_values(prompts, samples, values, threshold, sep)
    # step_dpo_pairs joins prompt + separator + steps: the prompt's own trailing separator is dropped
    return step_dpo_pairs([{**r, "prompt": r["prompt"].removesuffix(sep)} for r in records], separator=sep)
