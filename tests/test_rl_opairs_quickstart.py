"""RAFT against the issue's target, from the quickstart's SFT model (seed 0) with the quickstart's online
run (`preftune quickstart --method raft`: 200 steps × 16 prompts × 8 samples at temperature 0.7, lr
2.5e-5, and the task's options `online_hparams`: every correct sample kept, no wrong one): ≥ +5 points
of greedy accuracy on the 1000 held-out prompts. The numbers: docs/online.md and the online sweep in
docs/reports.md. Slow: SFT ~2 min of CPU, the run ~4 min."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch

from preftune.tasks.quickstart import QuickstartConfig, _online_config, evaluate_accuracy, prepare
from preftune.train.api import train

CFG = QuickstartConfig()


@pytest.mark.slow
def test_raft_gains_five_points(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    art = prepare(tmp_path / "qs", seed=0, config=CFG, log=lambda _m: None, with_pairs=False)
    config = _online_config("raft", dataclasses.replace(art, out_dir=tmp_path / "raft"), CFG, 0, False)
    assert config.hparams == {"keep": 0, "min_reward": 1.0}
    final = Path(train(config).final_dir)
    after = evaluate_accuracy(final, art.task, art.heldout_prompts, greedy=True)
    # measured (seed 0): 49.1 -> 55.9 % (+6.8), 220 s of CPU, in the online sweep (docs/reports.md), which
    # runs this config; at the earlier schedule (100 steps, lr 5e-5) 49.1 -> 55.3 % (+6.2, docs/online.md)
    assert after >= art.stats["accuracy_before"]["greedy"] + 0.05
