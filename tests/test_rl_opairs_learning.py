"""RAFT, online DPO, DNO, XPO learn on the arithmetic task: from the quickstart's SFT model (seed 0),
each raises greedy accuracy on the 1000 held-out prompts (slow: SFT ~5 min, then a few minutes per
method on 2 cores). Settings and measured gains: docs/online.md."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from preftune.config import TrainConfig
from preftune.tasks.arithmetic import ArithmeticTask
from preftune.tasks.quickstart import _load
from preftune.tasks.sft import SFTConfig, greedy_accuracy, max_new_tokens_for, train_sft
from preftune.train.api import train

TASK = ArithmeticTask()


@pytest.fixture(scope="module")
def sft(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("opairs_learning")
    heldout = [p.prompt for p in TASK.problems(1000, seed=10_000)]  # the quickstart's, seed 0
    prompts = [p.prompt for p in TASK.problems(800, seed=20_000, exclude=set(heldout))]
    result = train_sft(TASK, root / "sft", SFTConfig(seed=0), exclude_prompts=set(heldout))
    (root / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    model, tokenizer = _load(result.model_dir, TASK)
    before = greedy_accuracy(model, tokenizer, TASK, heldout, batch_size=128)
    return {"root": root, "dir": result.model_dir, "heldout": heldout, "prompts": prompts, "before": before}


# method → (run settings, loss options, the greedy gain asserted); measured gains in the comments
# (seed 0, the current SFT model at 49.1 %, 3 December 2026: 4 passed in 670 s wall at load 3-4; in
# brackets the gains on the earlier SFT model at 59.7 %, docs/online.md)
QUICK = {"max_steps": 50, "batch_size": 16, "num_generations": 8, "lr": 2e-5}  # the quickstart's online run
SMALL = {"max_steps": 40, "batch_size": 32, "num_generations": 4, "lr": 1e-4, "temperature": 0.7}
CASES: dict[str, tuple[dict[str, Any], dict[str, Any], float]] = {
    "raft_pp": (QUICK, {}, 0.02),  # +5.6 points (+4.2)
    "raft": (QUICK, {"keep": 0, "min_reward": 1}, 0.02),  # +5.5 (+3.8): every correct sample, no wrong one
    "online_dpo": ({**QUICK, "lr": 3e-5}, {"beta": 1.0}, 0.015),  # +3.4 (+3.1)
    "dno": (SMALL, {"beta": 1.0}, 0.015),  # +6.6 (+3.4)
}


@pytest.mark.slow
@pytest.mark.parametrize("method", sorted(CASES))
def test_method_raises_greedy_heldout_accuracy(sft: dict[str, Any], method: str) -> None:
    settings, hparams, gain = CASES[method]
    result = train(
        TrainConfig(
            method=method,
            model=str(sft["dir"]),
            prompts=str(sft["root"] / "prompts.jsonl"),
            reward="arithmetic",
            out=str(sft["root"] / method),
            hparams=hparams,
            warmup_ratio=0.0,
            scheduler="constant",
            max_completion_length=max_new_tokens_for(TASK, sft["prompts"]),
            progress=False,
            report=False,
            **settings,
        )
    )
    model, tokenizer = _load(result.final_dir, TASK)
    after = greedy_accuracy(model, tokenizer, TASK, sft["heldout"], batch_size=128)
    assert after >= sft["before"] + gain, (sft["before"], after)
