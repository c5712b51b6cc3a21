"""The built-in task's reward-model setting shared by the slow RM tests: the quickstart's SFT policy,
the verifier trunk, and the policy's own samples on 4000 training and 1000 held-out prompts.

`policy_trunk_samples(tmp_path)` builds them (~10 CPU-minutes, one thread); `own_pairs` turns samples
into correct ≻ wrong pairs of the policy's own samples; `cpu_seconds` is this process's CPU time.
"""

from __future__ import annotations

import resource
from pathlib import Path
from typing import Any, NamedTuple

from preftune.reward.processbench import processbench_from_task
from preftune.tasks.arithmetic import ArithmeticTask
from preftune.tasks.quickstart import build_pairs, sample_responses
from preftune.tasks.sft import SFTConfig, train_sft, verifier_trunk_config


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def own_pairs(task, prompts, samples, per_prompt):
    pairs, _, _ = build_pairs(task, prompts, samples, pairs_per_prompt=per_prompt, seed=0, rejected="full")
    sampled = dict(zip(prompts, (set(s) for s in samples)))
    return [r for r in pairs if r["chosen"] in sampled[r["prompt"]]]  # no reference solutions


class RewardSetting(NamedTuple):
    task: ArithmeticTask
    held: list[str]  # 1000 held-out prompts
    test_items: list[dict[str, Any]]  # 600 ProcessBench-style items (seed 2)
    trunk: Path  # the verifier trunk's folder
    prompts: list[str]  # 4000 training prompts
    samples: list[list[str]]  # 8 per training prompt, temperature 1
    held_samples: list[list[str]]  # 8 per held-out prompt


def policy_trunk_samples(tmp_path: Path) -> RewardSetting:
    """The SFT policy and the verifier trunk (neither trained on `held` or the test items), and the
    policy's samples."""
    task = ArithmeticTask(level=2)
    held = [p.prompt for p in task.problems(1000, seed=777)]
    test_items = processbench_from_task(600, level=2, seed=2)
    never = set(held) | {r["problem"] for r in test_items}
    sft, trunk = tmp_path / "sft", tmp_path / "trunk"
    train_sft(task, sft, SFTConfig(seed=0), exclude_prompts=set(held))
    train_sft(task, trunk, verifier_trunk_config(0), exclude_prompts=never)
    prompts = [p.prompt for p in task.problems(4000, seed=1, exclude=set(held))]
    samples = sample_responses(sft, task, prompts, num_samples=8, temperature=1.0, seed=1)
    held_samples = sample_responses(sft, task, held, num_samples=8, temperature=1.0, seed=0)
    return RewardSetting(task, held, test_items, trunk, prompts, samples, held_samples)
