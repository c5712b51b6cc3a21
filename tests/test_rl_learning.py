"""GRPO learns: from the quickstart's SFT model, `preftune train grpo` with the arithmetic verifier
raises greedy accuracy on the 1000 held-out prompts (slow: SFT ~5 min + GRPO ~3 min on 2 cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.config import TrainConfig
from preftune.tasks.arithmetic import ArithmeticTask
from preftune.tasks.quickstart import _load
from preftune.tasks.sft import SFTConfig, greedy_accuracy, max_new_tokens_for, train_sft
from preftune.train.api import train


@pytest.mark.slow
def test_grpo_raises_greedy_heldout_accuracy(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    task = ArithmeticTask()
    heldout = [p.prompt for p in task.problems(1000, seed=10_000)]  # the quickstart's, seed 0
    prompts = [p.prompt for p in task.problems(800, seed=20_000, exclude=set(heldout))]
    sft = train_sft(task, tmp_path / "sft", SFTConfig(seed=0), exclude_prompts=set(heldout))
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    model, tokenizer = _load(sft.model_dir, task)
    before = greedy_accuracy(model, tokenizer, task, heldout, batch_size=128)
    result = train(
        TrainConfig(
            method="grpo",
            model=str(sft.model_dir),
            prompts=str(tmp_path / "prompts.jsonl"),
            reward="arithmetic",
            out=str(tmp_path / "grpo"),
            max_steps=50,
            batch_size=16,
            num_generations=8,
            lr=2e-5,
            warmup_ratio=0.0,
            scheduler="constant",
            max_completion_length=max_new_tokens_for(task, prompts),
            progress=False,
            report=False,
        )
    )
    model, tokenizer = _load(result.final_dir, task)
    after = greedy_accuracy(model, tokenizer, task, heldout, batch_size=128)
    # measured once: 0.597 -> 0.625 (seed 0, 50 steps × 16 prompts × 8 samples)
    assert after >= before + 0.015, (before, after)
