"""PPO, MA-PPO and RTO learn: from the quickstart's SFT model (and, for RTO, its DPO model), greedy
accuracy on the 1000 held-out prompts rises (slow: SFT ~5-10 min, DPO ~2 min, each run ~5-14 min on
2 shared cores)."""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune.config import TrainConfig
from preftune.tasks.quickstart import QuickstartConfig, _online_config, held_out_accuracy, prepare
from preftune.train.api import train

CFG = QuickstartConfig()
# the quickstart's online settings (50 steps × 16 prompts × 8 samples) plus these; measured once
# (seed 0, docs/online.md): SFT 0.597 greedy → ppo 0.631, ma_ppo 0.630, rto 0.627, 865-985 s each
# with three runs in parallel at load 13-22 on 2 cores. The target (+5 points) is not met.
SETTINGS: dict[str, dict[str, Any]] = {
    "ppo": {"value_lr": 1e-3, "lr": 5e-5},
    "ma_ppo": {"value_lr": 1e-3},
    "rto": {"value_lr": 1e-3},
}


@pytest.fixture(scope="module")
def quickstart(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Path]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("ppo_learning")
    art = prepare(root / "qs", seed=0, config=CFG, log=lambda _m: None)
    dpo = train(
        TrainConfig(
            method="dpo", model=str(art.sft_dir), data=str(art.pairs_path), out=str(root / "dpo"),
            hparams={"beta": CFG.beta}, max_steps=CFG.max_steps, batch_size=CFG.batch_size, lr=CFG.lr,
            progress=False, report=False,
        )
    )  # fmt: skip
    return art, dpo.final_dir


@pytest.mark.slow
@pytest.mark.parametrize("method", ["ppo", "ma_ppo", "rto"])
def test_ppo_family_raises_greedy_heldout_accuracy(method: str, quickstart: tuple[Any, Path]) -> None:
    art, dpo_dir = quickstart
    extra = dict(SETTINGS[method])
    if method == "rto":
        extra["dpo_model"] = str(dpo_dir)
    out = art.out_dir.parent / method
    config: TrainConfig = replace(_online_config(method, replace(art, out_dir=out), CFG, 0, False), **extra)
    start = time.perf_counter()
    result = train(config)
    seconds = time.perf_counter() - start
    before = art.stats["accuracy_before"]["greedy"]
    after = held_out_accuracy(result.final_dir, art.task, art.heldout_prompts, CFG, seed=0)["greedy"]
    assert after >= before + 0.02, (method, before, after, seconds)
    assert seconds <= 1800, seconds  # 15-16 minutes at load 13-22
