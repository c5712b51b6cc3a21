"""Best-of-n with a reward model: sample N completions per prompt, keep the one the RM scores highest,
and measure it with a gold reward (the built-in task's verifier) — `preftune eval RUN --best-of-n N`.

    curve = best_of_n_curve(scores [P, N], gold [P, N], [1, 2, 4, 8])
    curve["rm"][k]      mean gold reward of the RM's pick among n = curve["n"][k] samples
    curve["oracle"][k]  mean gold reward of the best of the same n samples (what a perfect RM picks)

Each prompt's N samples are cut into N // n disjoint groups of n; every group contributes its pick, so
all N samples count at every n (an unbiased estimate of best-of-n with less variance than one group).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError


def curve_points(n_max: int) -> list[int]:
    """1, 2, 4, … up to n_max (n_max itself included)."""
    if n_max < 1:
        raise ConfigError(f"--best-of-n {n_max}: give the largest n, ≥ 1 (e.g. 16)")
    ns = [1]
    while ns[-1] * 2 <= n_max:
        ns.append(ns[-1] * 2)
    return ns if ns[-1] == n_max else [*ns, n_max]


def best_of_n_curve(scores: torch.Tensor, gold: torch.Tensor, ns: list[int]) -> dict[str, list[float]]:
    """Mean gold reward of the RM's pick (the first of equal scores) and of the oracle's, per n.

    scores, gold: [P prompts, N samples]; every n must divide into N at least once (n ≤ N)."""
    if scores.shape != gold.shape or scores.dim() != 2:
        raise ConfigError(
            f"best-of-n: scores {tuple(scores.shape)} and gold {tuple(gold.shape)} must be [P, N]"
        )
    p, n_all = scores.shape
    rm, oracle = [], []
    for n in ns:
        if not 1 <= n <= n_all:
            raise ConfigError(f"best-of-n: n = {n} needs at least {n} samples per prompt, have {n_all}")
        g = n_all // n
        s = scores[:, : g * n].reshape(p, g, n)
        y = gold[:, : g * n].reshape(p, g, n).double()
        pick = s.argmax(-1, keepdim=True)  # the first maximum
        rm.append(float(y.gather(-1, pick).mean()))
        oracle.append(float(y.max(-1).values.mean()))
    return {"n": [float(n) for n in ns], "rm": rm, "oracle": oracle}


def sample_and_score(
    scorer: Any,
    policy: str,
    prompts_path: str,
    gold: str,
    n_max: int,
    *,
    temperature: float = 1.0,
    max_new_tokens: int = 64,
    seed: int = 0,
) -> dict[str, Any]:
    """Sample n_max completions per prompt of `prompts_path` from `policy`, score them with `scorer`
    (a reward function: an RM folder's `RewardModelFn`, an ensemble) and with the `gold` reward spec;
    returns the curve (`best_of_n_curve`) with the prompt and sample counts and `unfinished`, the
    fraction of samples cut at `max_new_tokens` before their end of sequence."""
    from preftune.data.formatting import load_tokenizer
    from preftune.generation import generate
    from preftune.models.load import load_causal_lm
    from preftune.reward.registry import load_reward
    from preftune.rl.prompts import load_prompts

    tokenizer = load_tokenizer(policy)
    rows = load_prompts(prompts_path, tokenizer)
    model = load_causal_lm(policy)
    ids = generate(model, tokenizer, [r.ids for r in rows], num_samples=n_max,
                   max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)  # fmt: skip
    texts = [r.text for r in rows for _ in range(n_max)]
    completions = [str(tokenizer.decode(s, skip_special_tokens=True)) for out in ids for s in out]
    columns = {k: [r.columns.get(k) for r in rows for _ in range(n_max)] for k in rows[0].columns}
    gold_values = load_reward(gold)(texts, completions, **columns).view(len(rows), n_max)
    scores = torch.as_tensor(scorer(texts, completions), dtype=torch.float64).view(len(rows), n_max)
    curve = best_of_n_curve(scores, gold_values, curve_points(n_max))
    eos = tokenizer.eos_token_id
    unfinished = sum(not s or s[-1] != eos for out in ids for s in out) / max(len(completions), 1)
    return {
        "prompts": len(rows), "samples": n_max, "gold": gold, "policy": str(Path(policy)),
        "unfinished": unfinished, "max_new_tokens": max_new_tokens, **curve,
    }  # fmt: skip
