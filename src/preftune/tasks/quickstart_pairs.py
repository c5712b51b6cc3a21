"""The quickstart's preference pairs from verifier-labelled samples: response-level pairs (correct ≻
the wrong sample, by default cut after its first wrong character) and Step-DPO pairs (Lai et al. 2024)."""

from __future__ import annotations

import random
from typing import Any

from preftune.errors import ConfigError
from preftune.tasks.arithmetic import ArithmeticTask, parse_prompt


def first_error_prefix(reference: str, sample: str) -> str:
    """`sample` up to and including its first character that differs from `reference`.

    A sample that is a strict prefix of the reference is returned whole: its error is the EOS the
    tokenizer appends. Why cut: after the first error the rest of a wrong sample is mostly *correct*
    arithmetic on wrong inputs (e.g. `4+8+0=12` after a dropped carry), and a pairwise loss on the
    whole text pushes those correct computations down too; cut, the rejected side carries only the
    mistake (the idea of Step-DPO, Lai et al. 2024, at token granularity; cf. Lin et al. 2024, cDPO).
    """
    i = next(
        (j for j, (a, b) in enumerate(zip(reference, sample)) if a != b), min(len(reference), len(sample))
    )
    return sample if i >= len(sample) else sample[: i + 1]


def build_pairs(
    task: ArithmeticTask,
    prompts: list[str],
    responses: list[list[str]],
    *,
    pairs_per_prompt: int,
    seed: int,
    rejected: str = "first_error",
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], dict[str, int]]:
    """Response-level and step-level preference records from verifier-labelled samples.

    Response pairs: chosen = a fully correct sample (steps and answer; the reference solution when none
    was sampled), rejected = a sample with a wrong answer (rejected="full") or that sample cut after its
    first wrong character (rejected="first_error", see `first_error_prefix`); distinct texts only.
    Step pairs (Step-DPO, Lai et al. 2024) via `preftune.data.transforms.step_dpo_pairs`, one per
    distinct wrong sample whose first error is on a line it wrote.
    """
    if rejected not in ("first_error", "full"):
        raise ConfigError(f"quickstart: rejected={rejected!r}; use 'first_error' or 'full'")
    from preftune.data.transforms import step_dpo_pairs

    rng = random.Random(f"pairs:{seed}")
    pairs: list[dict[str, Any]] = []
    step_records: list[dict[str, Any]] = []
    counts = {"samples": 0, "correct": 0, "fully_correct": 0, "reference_chosen": 0}
    for prompt, samples in zip(prompts, responses):
        unique = list(dict.fromkeys(samples))
        verdicts = [task.verify(prompt, s) for s in unique]
        by_text = dict(zip(unique, verdicts))
        counts["samples"] += len(samples)
        counts["correct"] += sum(int(by_text[s].correct) for s in samples)
        counts["fully_correct"] += sum(int(by_text[s].fully_correct) for s in samples)
        good = [s for s, v in zip(unique, verdicts) if v.fully_correct]
        # An empty response (EOS first) is wrong but cannot be a data record: it is left out.
        bad = [(s, v) for s, v in zip(unique, verdicts) if not v.correct and s.strip()]
        if bad and not good:
            good = [task.solution(parse_prompt(prompt))]
            counts["reference_chosen"] += 1
        rng.shuffle(good)
        reference_text = task.solution(parse_prompt(prompt))
        seen: set[str] = set()
        for s, _ in bad:
            r = first_error_prefix(reference_text, s) if rejected == "first_error" else s
            if r in seen or not r.strip():
                continue
            seen.add(r)
            pairs.append({"prompt": prompt, "chosen": good[len(seen) % len(good)], "rejected": r})
            if len(seen) == pairs_per_prompt:
                break
        reference = task.solution(parse_prompt(prompt)).split("\n")
        for s, v in bad:
            lines = s.split("\n")
            k = v.first_error
            if k is not None and k < len(lines) and k < len(reference):
                step_records.append(
                    {
                        "prompt": prompt.rstrip("\n"),
                        "steps": lines,
                        "first_error": k,
                        "correct_step": reference[k],
                    }
                )
    return pairs, step_dpo_pairs(step_records, separator="\n"), counts
