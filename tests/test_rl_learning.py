"""GRPO, RLOO and ReMax learn: from the quickstart's SFT model (`prepare`), GRPO with the quickstart's
online settings (`_online_config`: the arithmetic verifier, 16 prompts × 8 completions at temperature
0.7, lr 2.5e-5, 200 steps) raises greedy accuracy on the 1000 held-out prompts by ≥ 8 points on seeds
0, 1 and 2, and RLOO and ReMax (7 samples + its greedy baseline) end within 2 points of GRPO — the
issue's target (slow: SFT + three online runs per seed, ~15 minutes of CPU a seed).

The SFT model differs between machines (one-thread float32 kernels chosen per CPU round differently;
the SFT stops at a different step, docs/quickstart.md), and so do the outcomes. Measured with these
settings on one machine (docs/quickstart.md, "The online defaults"): GRPO +9.0 / +15.5 / +14.9, RLOO
0.2 / 0.7 / 0.1 from it, ReMax 0.2 / 0.7 / 1.5 behind it. With the earlier defaults (100 steps at
5e-5) GRPO missed +8 on seed 0 of one machine and ReMax the 2 points on other cells of each."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from preftune.tasks.quickstart import Artifacts, QuickstartConfig, _load, _online_config, prepare
from preftune.tasks.sft import greedy_accuracy
from preftune.train.api import train

CFG = QuickstartConfig()
_PREPARED: dict[int, Artifacts] = {}
_AFTER: dict[tuple[int, str], float] = {}


def _prepared(seed: int, root: Path) -> Artifacts:
    """The quickstart's SFT model and prompts of `seed` (made once per seed for the module)."""
    if seed not in _PREPARED:
        torch.set_num_threads(1)
        _PREPARED[seed] = prepare(
            root / f"qs{seed}", seed=seed, config=CFG, log=lambda _m: None, with_pairs=False
        )
    return _PREPARED[seed]


def _after(seed: int, method: str, root: Path) -> float:
    """Greedy held-out accuracy after `method`'s quickstart run from the SFT model of `seed`."""
    if (seed, method) not in _AFTER:
        art = _prepared(seed, root)
        run = dataclasses.replace(art, out_dir=root / f"qs{seed}-{method}")
        result = train(_online_config(method, run, CFG, seed, False))
        model, tokenizer = _load(result.final_dir, art.task)
        _AFTER[seed, method] = greedy_accuracy(
            model, tokenizer, art.task, art.heldout_prompts, batch_size=128
        )
    return _AFTER[seed, method]


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_grpo_raises_greedy_heldout_accuracy(seed: int, tmp_path_factory: pytest.TempPathFactory) -> None:
    root = tmp_path_factory.getbasetemp() / "rl_learning"
    before = _prepared(seed, root).stats["accuracy_before"]["greedy"]
    after = _after(seed, "grpo", root)
    # measured (docs/quickstart.md, 1000 prompts): seed 0 49.1 -> 58.1 % (+9.0),
    # seed 1 47.2 -> 62.7 % (+15.5), seed 2 54.9 -> 69.8 % (+14.9)
    assert after >= before + 0.08, (seed, before, after)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["rloo", "remax"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_rloo_remax_within_two_points_of_grpo(
    seed: int, method: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """RLOO, and ReMax at GRPO's completion budget (7 samples + its greedy baseline), end within 2
    points of GRPO's greedy held-out accuracy (the issue's target)."""
    root = tmp_path_factory.getbasetemp() / "rl_learning"
    grpo, other = _after(seed, "grpo", root), _after(seed, method, root)
    # measured (docs/quickstart.md, 1000 prompts) against grpo 58.1 / 62.7 / 69.8 %: rloo
    # 57.9 / 63.4 / 69.9 %, remax 57.9 / 62.0 / 68.3 %
    assert abs(other - grpo) <= 0.02 + 1e-9, (seed, method, grpo, other)  # 1e-9: 2 points inclusive
