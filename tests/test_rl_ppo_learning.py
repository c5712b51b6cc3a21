"""PPO, MA-PPO and RTO learn: from the quickstart's SFT model (and, for RTO, the quickstart's DPO
model trained from it), greedy accuracy on the 1000 held-out prompts rises by ≥ 5 points within 10
minutes of CPU — the issue's target. Settings: the quickstart's online schedule (`_online_config`:
200 steps × 16 prompts × 8 samples, lr 2.5e-5, temperature 0.7) plus `--value-lr 1e-3`. A method
measured below the target is a strict expected failure with its number (docs/online.md, "PPO with a
value head"). Slow: SFT (+ pairs and DPO for RTO), then one run each, ~2-4 minutes of CPU a run."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from measured_cases import measured_cases
from preftune.config import TrainConfig
from preftune.tasks.quickstart import Artifacts, QuickstartConfig, _load, _online_config, prepare
from preftune.tasks.sft import greedy_accuracy
from preftune.train.api import train

CFG = QuickstartConfig()
SETTINGS: dict[str, dict[str, Any]] = {name: {"value_lr": 1e-3} for name in ("ppo", "ma_ppo", "rto")}
# measured on seed 0 (docs/online.md; SFT 49.1 %): ppo 56.9 % (+7.8, 391 s CPU), ma_ppo 59.4 % (+10.3,
# 382 s CPU), rto 57.7 % (+8.6, 342 s CPU). A method below +5 points would be a strict xfail here
MEASURED: dict[str, str] = {}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> Artifacts:
    torch.set_num_threads(1)
    return prepare(tmp_path_factory.mktemp("ppo_learning") / "qs", seed=0, config=CFG, log=lambda _m: None)


def _dpo_model(art: Artifacts) -> str:
    """The quickstart's DPO run from the SFT model on its pairs (RTO's token rewards)."""
    result = train(
        TrainConfig(
            method="dpo", model=str(art.sft_dir), data=str(art.pairs_path), out=str(art.out_dir.parent / "dpo"),
            hparams={"beta": CFG.beta}, max_steps=CFG.max_steps, batch_size=CFG.batch_size, lr=CFG.lr,
            progress=False, report=False,
        )
    )  # fmt: skip
    return str(result.final_dir)


@pytest.mark.slow
@pytest.mark.timeout(0)  # minutes of CPU, hours of wall time on a loaded machine
@pytest.mark.parametrize("method", measured_cases(("ppo", "ma_ppo", "rto"), MEASURED))
def test_ppo_family_gains_five_points_of_greedy_heldout_accuracy(method: str, prepared: Artifacts) -> None:
    art = prepared
    extra = dict(SETTINGS[method])
    if method == "rto":
        extra["dpo_model"] = _dpo_model(art)
    out: Path = art.out_dir.parent / method
    config: TrainConfig = replace(_online_config(method, replace(art, out_dir=out), CFG, 0, False), **extra)
    start = time.process_time()
    result = train(config)
    cpu = time.process_time() - start
    model, tokenizer = _load(result.final_dir, art.task)
    after = greedy_accuracy(model, tokenizer, art.task, art.heldout_prompts, batch_size=128)
    before = art.stats["accuracy_before"]["greedy"]
    print(f"{method}: greedy {before:.3f} -> {after:.3f} ({100 * (after - before):+.1f}), {cpu:.0f} s CPU")
    assert cpu <= 600, cpu
    assert after >= before + 0.05, (method, before, after)
