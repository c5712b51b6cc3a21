"""Batch statistics under real data parallelism: `torchrun --nproc_per_node 2` with KTO (z₀) and BCO
(running δ) gives the same run as one process with the same global batch. Slow: two interpreters."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from test_train_distributed import run_torchrun
from test_train_fixtures import pair_rows, tiny_model, write_jsonl


@pytest.mark.slow
@pytest.mark.parametrize(("method", "statistic"), [("kto", "kto/z0"), ("bco", "bco/delta")])
def test_two_processes_equal_one_with_a_batch_statistic(tmp_path: Path, method: str, statistic: str) -> None:
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    args = ["train", method, "--model", str(model), "--data", str(data), "--batch-size", "8"]
    args += ["--max-steps", "3", "--lr", "3e-3", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")]) == 0
    two = [
        *args,
        "--micro-batch-size",
        "2",
        "--out",
        str(tmp_path / "two"),
        "--cache-dir",
        str(tmp_path / "c2"),
    ]
    proc = run_torchrun(two)
    assert proc.returncode == 0, proc.stderr[-3000:]
    w1 = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    w2 = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in w1:
        torch.testing.assert_close(w2[k], w1[k], atol=2e-5, rtol=1e-4)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    steps = [(a, b) for a, b in zip(m1, m2) if a.get("split") == "train"]
    assert len(steps) == 3 and any(abs(a[statistic]) > 1e-6 for a, _ in steps[1:])
    for a, b in steps:
        for key in ("loss", statistic, "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key
