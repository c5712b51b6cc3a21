"""Step labels for PRM training: exact (the built-in task's verifier), Monte-Carlo (Math-Shepherd), PAV.

- `verifier_record`: the arithmetic task checks every line against the reference, so the first wrong
  step is known exactly: no rollouts needed.
- `mc_values` + `math_shepherd_labels`: Wang et al. 2024 (Math-Shepherd), §3.3. From the prefix
  ending at step k, N completions are sampled and checked; the hard estimate is
      y_k^HE = 1 if any of the N reaches the right answer else 0              (eq. 3)
  and the soft estimate the fraction that do,
      y_k^SE = (1/N) Σ_j 1[completion j right]                                (eq. 4)
- `pav_targets`: Setlur et al. 2024 ("Rewarding Progress"), eq. 4 and §3: the process advantage of a
  prover μ, A^μ(s_k, a_k) = Q^μ(s_k, a_k) − V^μ(s_k) = V^μ(s_{k+1}) − V^μ(s_k) (a step appends
  text, so Q of a step is V of the longer prefix), with s_0 the bare prompt. The paper's prover is
  Best-of-K of the policy; its value from the policy's success rate p is 1 − (1 − p)^K (§4, the
  BoK(π) value), so one set of policy rollouts gives every K.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from preftune.errors import ConfigError

Rollout = Callable[[list[str], list[str], int], list[list[str]]]
"""rollout(prompts, prefixes, n) → [i][j] the j-th sampled continuation of prompts[i] + prefixes[i]."""
Checker = Callable[[str, str], bool]
"""check(prompt, full response) → whether the final answer is right."""


def arithmetic_check(prompt: str, response: str) -> bool:
    """The built-in task's outcome check: the stated `answer:` is right."""
    from preftune.tasks.arithmetic import verify

    return verify(prompt, response).correct


def verifier_record(prompt: str, response: str) -> dict[str, Any]:
    """A PRM record of an arithmetic response labelled exactly: steps = its lines, `first_error` = the
    verifier's first wrong line (−1 when every line is right). A response shorter than the reference
    has its first missing line as the error: it is put on the last line written."""
    from preftune.tasks.arithmetic import verify

    steps = [ln for ln in response.strip("\n").split("\n")]
    if not response.strip():
        raise ConfigError("verifier_record: an empty response has no steps")
    v = verify(prompt, response)
    k = -1 if v.first_error is None else min(v.first_error, len(steps) - 1)
    return {"prompt": prompt, "steps": steps, "first_error": k}


def character_record(prompt: str, steps: Sequence[str], separator: str = "\n") -> dict[str, Any]:
    """The exact labels of an arithmetic solution at character granularity: a PRM record whose steps
    are the characters of `separator.join(steps) + separator` (train it with `--separator ""`), each
    labelled 1 while the text so far is a prefix of the reference solution and 0 from the first
    character that departs from it on (ProcessBench's convention, carried from lines to characters;
    Math-Shepherd's "can still reach the right answer" for a task with one right solution). A text
    that stops short of the reference has its last character labelled 0. The label at each line's
    separator is the line's own exact label, so such a PRM is read at line ends like a line-level one
    (`evaluate_prm_folder(..., separator="\n")`); the labels in between put the supervision on the
    character where the error is."""
    from preftune.tasks.arithmetic import parse_prompt, solution

    text = separator.join(steps) + separator
    if not steps or not all(steps):
        raise ConfigError("character_record: give a non-empty list of non-empty steps")
    reference = separator.join(solution(parse_prompt(prompt)).split("\n")) + separator
    first = next(
        (i for i, (a, b) in enumerate(zip(text, reference)) if a != b), min(len(text), len(reference))
    )
    if first == len(text) and len(text) < len(reference):
        first = len(text) - 1  # stopped early: the missing rest is an error at the last character
    return {
        "prompt": prompt,
        "steps": list(text),
        "labels": [1 if i < first else 0 for i in range(len(text))],
    }


def mc_values(prompts: Sequence[str], steps: Sequence[Sequence[str]], rollout: Rollout, n: int,
              check: Checker = arithmetic_check, separator: str = "\n") -> list[list[float]]:  # fmt: skip
    """Monte-Carlo values V̂(s_k), k = 0..K per solution (K + 1 numbers: the bare prompt, then each
    prefix ending with step k): the fraction of `n` sampled completions of the prefix that `check`
    accepts. The full solution (k = K) is checked as it stands, without sampling."""
    if n < 1:
        raise ConfigError(f"Monte-Carlo labels need n ≥ 1 completions per prefix, got {n}")
    queries: list[tuple[int, int, str]] = []
    for i, ss in enumerate(steps):
        for k in range(len(ss)):
            queries.append((i, k, "".join(s + separator for s in ss[:k])))
    conts = rollout([prompts[i] for i, _, _ in queries], [q[2] for q in queries], n) if queries else []
    values = [[0.0] * (len(ss) + 1) for ss in steps]
    for (i, k, prefix), samples in zip(queries, conts):
        if len(samples) != n:
            raise ConfigError(f"rollout returned {len(samples)} continuations for one prefix, expected {n}")
        values[i][k] = sum(check(prompts[i], prefix + c) for c in samples) / n
    for i, ss in enumerate(steps):
        values[i][len(ss)] = float(check(prompts[i], separator.join(ss)))
    return values


def math_shepherd_labels(values: Sequence[float], how: str = "hard") -> list[float]:
    """Step labels from MC values V̂(s_0..s_K): step k's label is the estimate after it, V̂(s_{k+1});
    `hard`: 1 if any completion was right (eq. 3), `soft`: the fraction (eq. 4)."""
    if how not in ("hard", "soft"):
        raise ConfigError(f"Math-Shepherd estimation '{how}': use 'hard' or 'soft'")
    after = list(values[1:])
    return [float(v > 0) for v in after] if how == "hard" else [float(v) for v in after]


def best_of_k_value(p: float, k: int) -> float:
    """V of the Best-of-K prover from the policy's success rate p: 1 − (1 − p)^K (Setlur et al. 2024)."""
    if k < 1:
        raise ConfigError(f"Best-of-K prover needs K ≥ 1, got {k}")
    return 1.0 - (1.0 - p) ** k


def pav_targets(values: Sequence[float], prover_k: int = 1) -> list[float]:
    """Process advantages Â^μ_k = V^μ(s_{k+1}) − V^μ(s_k), k = 0..K−1, of the prover μ = Best-of-K of
    the policy whose MC values are `values` (K + 1 numbers, from `mc_values`); prover_k = 1 is the
    policy itself."""
    v = [best_of_k_value(p, prover_k) for p in values]
    return [v[k + 1] - v[k] for k in range(len(v) - 1)]


def policy_rollout(model: Any, tokenizer: Any, *, max_new_tokens: int, temperature: float = 1.0,
                   seed: int = 0, batch_size: int = 64) -> Rollout:  # fmt: skip
    """A `Rollout` sampling continuations from a causal LM: the prompt and prefix are tokenized as
    plain text (`preftune.tasks.sft.encode`), continuations decoded without special tokens."""
    from preftune.generation import generate
    from preftune.tasks.sft import encode

    def rollout(prompts: list[str], prefixes: list[str], n: int) -> list[list[str]]:
        ids = [encode(tokenizer, p + q)[0] for p, q in zip(prompts, prefixes)]
        out = generate(model, tokenizer, ids, num_samples=n, max_new_tokens=max_new_tokens,
                       temperature=temperature, seed=seed, batch_size=batch_size)  # fmt: skip
        return [[tokenizer.decode(s, skip_special_tokens=True) for s in row] for row in out]

    return rollout


def label_samples(prompts: Sequence[str], samples: Sequence[str], how: str = "verifier", *,
                  rollout: Rollout | None = None, n: int = 8, prover_k: int = 1,
                  check: Checker = arithmetic_check, separator: str = "\n") -> list[dict[str, Any]]:  # fmt: skip
    """PRM records of sampled solutions (one prompt per sample; steps = the sample split at `separator`):

    `verifier`  exact first wrong line of the arithmetic task (`verifier_record`)
    `mc_hard`   Math-Shepherd hard estimate from `n` rollouts per prefix (`rollout` required)
    `mc_soft`   Math-Shepherd soft estimate
    `pav`       PAV targets of the Best-of-`prover_k` prover (train with --loss pav_mse)
    """
    if how == "verifier":
        return [verifier_record(p, s) for p, s in zip(prompts, samples)]
    if how not in ("mc_hard", "mc_soft", "pav"):
        raise ConfigError(f"step labels '{how}': use verifier, mc_hard, mc_soft or pav")
    if rollout is None:
        raise ConfigError(f"step labels '{how}' need a rollout (policy_rollout(model, tokenizer, ...))")
    steps = [[s for s in sample.split(separator) if s.strip()] for sample in samples]
    values = mc_values(prompts, steps, rollout, n, check, separator)
    out = []
    for p, ss, v in zip(prompts, steps, values):
        labels = pav_targets(v, prover_k) if how == "pav" else math_shepherd_labels(v, how[3:])
        out.append({"prompt": p, "steps": ss, "labels": labels})
    return out
