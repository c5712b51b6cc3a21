"""A trained reward-model folder as `--reward` of `preftune train grpo`, end to end on tiny models."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_grpo_with_a_reward_model_folder_as_its_reward(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "prefs.jsonl", pair_rows(8, seed=1))
    rm = tmp_path / "rm"
    assert main(["train", "rm", "--model", str(model), "--data", str(data), "--out", str(rm),
                 "--max-steps", "2", "--batch-size", "4", "--lr", "1e-3"]) == 0  # fmt: skip
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": r["prompt"]} for r in pair_rows(4)])
    # the same reward written as a user function: the folder's scores through RewardModelFn
    (tmp_path / "via_fn.py").write_text(
        "from preftune.reward.model_reward import RewardModelFn\n"
        f"_rm = RewardModelFn({str(rm / 'final')!r})\n"
        "def score(prompts, completions, **kw):\n    return _rm(prompts, completions)\n"
    )
    base = ["train", "grpo", "--model", str(model), "--prompts", str(prompts), "--num-generations", "4",
            "--batch-size", "4", "--max-completion-length", "5", "--max-steps", "2", "--lr", "3e-3",
            "--no-progress", "--no-report"]  # fmt: skip
    assert main([*base, "--reward", str(rm / "final"), "--out", str(tmp_path / "g1")]) == 0
    assert main([*base, "--reward", f"{tmp_path / 'via_fn.py'}:score", "--out", str(tmp_path / "g2")]) == 0
    rows = [json.loads(x) for x in (tmp_path / "g1" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(x) for x in (tmp_path / "g2" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows] == pytest.approx([r["reward"] for r in again], abs=1e-6)
    assert rows[0]["zero_signal_fraction"] < 1  # the RM's scores differ within a group: it trains
    a = load_file(str(tmp_path / "g1" / "final" / "model.safetensors"))
    b = load_file(str(tmp_path / "g2" / "final" / "model.safetensors"))
    start = load_file(str(model / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)
    assert any(not torch.equal(a[k], start[k]) for k in a)
