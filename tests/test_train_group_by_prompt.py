"""`group_by_prompt`: the data order shuffles prompts instead of examples, so the pairs of one prompt
share batches (and, with `build_packed(merge_prompts=True)`, packed rows); resume stays exact."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.train import run as train_run
from preftune.train.loop import batch_indices
from test_train_fixtures import ranked_rows, tiny_model, write_jsonl


def _epoch(n: int, batch: int, groups: list[int] | None, epoch: int = 0) -> list[int]:
    per_epoch = -(-n // batch)
    return [
        i
        for s in range(epoch * per_epoch, (epoch + 1) * per_epoch)
        for i in batch_indices(n, batch, seed=3, phase=1, step=s, groups=groups)
    ]


def test_singleton_groups_give_the_ungrouped_order() -> None:
    assert _epoch(23, 4, list(range(23))) == _epoch(23, 4, None)
    assert _epoch(23, 4, list(range(23)), epoch=2) == _epoch(23, 4, None, epoch=2)


def test_each_group_is_contiguous_and_every_example_used_once() -> None:
    groups = [i // 3 for i in range(30)]  # 10 prompts with 3 pairs each, in data order
    for epoch in range(3):
        order = _epoch(30, 4, groups, epoch)
        assert sorted(order) == list(range(30))
        runs = [order[k : k + 3] for k in range(0, 30, 3)]
        assert all(len({groups[i] for i in r}) == 1 and r == sorted(r) for r in runs)
    assert _epoch(30, 4, groups, 0) != _epoch(30, 4, groups, 1)  # still shuffled, per epoch


def test_grouped_run_resumes_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pairs built from ranked lists share prompts; a grouped run stopped in step 3 and resumed ends
    bit-identical to the uninterrupted one (the reference cache follows the grouped order too)."""
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "ranked.jsonl", ranked_rows(12))
    args = ["train", "dpo", "--model", str(model), "--data", str(data), "--ranked-pairs", "all_pairs"]
    args += ["--cache-dir", str(tmp_path / "cache"), "--batch-size", "4", "--max-steps", "4"]
    args += ["--save-every", "2", "--lr", "3e-3", "--group-by-prompt", "--no-progress"]
    seen: list[list[str]] = []
    real = train_run.objective_on_batch

    def spy(model: Any, batch: Any, **kw: Any) -> Any:
        seen.append([e.prompt_ids for e in batch])
        return real(model, batch, **kw)

    monkeypatch.setattr(train_run, "objective_on_batch", spy)
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    # 3 pairs per prompt, batches of 4: every batch holds at most 2 prompts, and some batch holds a
    # prompt's 3 pairs together (ungrouped, 12 x 3 pairs would rarely meet)
    assert all(len({tuple(p) for p in b}) <= 2 for b in seen)
    calls = {"n": 0}

    def stopping(model: Any, batch: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("stopped in step 3")
        return real(model, batch, **kw)

    monkeypatch.setattr(train_run, "objective_on_batch", stopping)
    with pytest.raises(RuntimeError, match="step 3"):
        main([*args, "--out", str(tmp_path / "stopped")])
    monkeypatch.setattr(train_run, "objective_on_batch", real)
    assert main([*args, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    expected = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert all(torch.equal(expected[k], resumed[k]) for k in expected)
