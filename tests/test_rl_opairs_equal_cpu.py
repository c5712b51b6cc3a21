"""Online DPO, DNO and XPO against the offline quickstart DPO in the same CPU time (the issue's target):
from the quickstart's SFT model (seed 0), the offline pipeline's cost is its sampling (4 samples and the
greedy one for each training prompt) plus its 100-step DPO run; each online method, with two samples per
prompt at temperature 0.3 plus (DNO) the task's solution as teacher, 32 prompts per rollout, each
rollout trained twice, the rejected response ended at its first token that differs from the chosen one
(`cut_rejected`, the offline pairs' first-error cut), a linear schedule with 10 % warm-up, must reach
the offline run's held-out greedy gain within that CPU time, +15 %: the process CPU time of one run on a
shared 2-core machine moves by about ±10 % with the other jobs. DNO runs 100 steps; online DPO, whose
pairs come only from prompts with a right and a wrong sample, 200 (its 100-step run takes half the
budget), XPO 140 (it also samples ỹ ~ π_ref for each pair). Measured (docs/online.md, "Online DPO, DNO
and XPO against the offline quickstart DPO at equal CPU"): this test's run gave offline +11.7 in 36 s of
CPU, dno +13.2 in 27 s; online_dpo and xpo (MEASURED) are strict expected failures. Slow: SFT ~1.5 min
of CPU, then ~0.5 min per run."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from measured_cases import measured_cases
from preftune.config import TrainConfig
from preftune.tasks.quickstart import (
    Artifacts,
    QuickstartConfig,
    _load,
    _offline_config,
    _sample_pairs,
    evaluate_accuracy,
    online_settings,
    prepare,
)
from preftune.train.api import train

CFG = QuickstartConfig()
ONLINE = {
    "num_generations": 2, "batch_size": 32, "num_iterations": 2, "lr": 3e-5, "temperature": 0.3,
    "scheduler": "linear", "warmup_ratio": 0.1,
}  # fmt: skip
STEPS = {"dno": 100, "online_dpo": 200, "xpo": 140}  # XPO also samples ỹ ~ π_ref per pair
CPU_TOLERANCE = 1.15  # the spread of one run's CPU time under this machine's shared load (docstring)
MEASURED = {  # this test's run, seed 0, 3 December 2026 (evening), an idle 2-core machine
    "online_dpo": "+9.2 points in 33 s of CPU against offline DPO's +11.7 in 36 s",
    "xpo": "+7.8 points in 33 s of CPU against offline DPO's +11.7 in 36 s",
}


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The prepared task, and the offline pipeline's CPU (sampling + DPO) and held-out greedy gain."""
    torch.set_num_threads(1)
    art = prepare(tmp_path_factory.mktemp("equal_cpu") / "qs", seed=0, config=CFG, log=lambda _m: None)
    model, _ = _load(art.sft_dir, art.task)
    prompts = [json.loads(line)["prompt"] for line in Path(str(art.prompts_path)).read_text().splitlines()]
    start = time.process_time()  # the sampling again, timed alone (prepare also trains the SFT model)
    _sample_pairs(model, art.task, prompts, CFG, 0, lambda _m: None, {})
    sampling = time.process_time() - start
    start = time.process_time()
    result = train(_offline_config("dpo", art, CFG, 0, False, art.out_dir.parent / "dpo"))
    cpu = sampling + time.process_time() - start
    gain = evaluate_accuracy(result.final_dir, art.task, art.heldout_prompts) - _before(art)
    print(f"offline dpo: {100 * gain:+.1f} points in {cpu:.0f} s of CPU ({sampling:.0f} s sampling)")
    return {"art": art, "cpu": cpu, "gain": gain}


def _before(art: Artifacts) -> float:
    return float(art.stats["accuracy_before"]["greedy"])


@pytest.mark.slow
@pytest.mark.timeout(0)  # minutes of CPU, more of wall time on a loaded machine
@pytest.mark.parametrize("method", measured_cases(("dno", "online_dpo", "xpo"), MEASURED))
def test_online_pair_method_matches_offline_dpo_in_its_cpu_time(offline: dict[str, Any], method: str) -> None:
    art: Artifacts = offline["art"]
    settings = {
        **online_settings(CFG, art.task, Path(str(art.prompts_path))),
        **ONLINE,
        "max_steps": STEPS[method],
    }
    config = TrainConfig(
        method=method, model=str(art.sft_dir), out=str(art.out_dir.parent / method), seed=0,
        progress=False, report=False, hparams={"beta": CFG.beta, "cut_rejected": True}, **settings,
    )  # fmt: skip
    start = time.process_time()
    result = train(config)
    cpu = time.process_time() - start
    gain = evaluate_accuracy(result.final_dir, art.task, art.heldout_prompts) - _before(art)
    print(f"{method}: {100 * gain:+.1f} points in {cpu:.0f} s of CPU")
    assert cpu <= CPU_TOLERANCE * offline["cpu"], (method, cpu, offline["cpu"])
    assert gain >= offline["gain"], (method, gain, offline["gain"])
