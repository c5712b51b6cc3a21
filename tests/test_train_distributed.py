"""`torchrun --nproc_per_node 2 -m preftune train` on CPU (gloo) gives the same run as one process with
the same global batch (docs/algorithms.md §6: 2 ranks × 4 = 1 × 8). Slow: it starts two interpreters."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from test_train_fixtures import pair_rows, tiny_model, write_jsonl


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_torchrun(args: list[str]) -> subprocess.CompletedProcess[str]:
    """`torchrun --nproc_per_node 2 -m preftune ARGS` on a free port, one torch thread per process."""
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).parent / "torchrun")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    cmd = [torchrun, "--nproc_per_node", "2", "--master_port", str(free_port()), "-m", "preftune", *args]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_two_processes_equal_one(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    args = [
        "train",
        "dpo:1.0,sft:0.3",
        "--model",
        str(model),
        "--data",
        str(data),
        "--batch-size",
        "8",
        "--max-steps",
        "3",
        "--lr",
        "3e-3",
        "--no-progress",
        "--save-every",
        "2",
    ]
    assert main([*args, "--out", str(tmp_path / "one"), "--cache-dir", str(tmp_path / "c1")]) == 0
    proc = run_torchrun(
        [
            *args,
            "--micro-batch-size",
            "2",
            "--out",
            str(tmp_path / "two"),
            "--cache-dir",
            str(tmp_path / "c2"),
        ]
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("done: 3 steps") == 1  # only rank 0 reports
    one = load_file(str(tmp_path / "one" / "final" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "final" / "model.safetensors"))
    for k in one:
        torch.testing.assert_close(two[k], one[k], atol=2e-5, rtol=1e-4)
    m1 = [json.loads(x) for x in (tmp_path / "one" / "metrics.jsonl").read_text().splitlines()]
    m2 = [json.loads(x) for x in (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()]
    for a, b in zip(m1, m2):
        for key in ("loss", "loss/sft", "rewards/margin", "logps/chosen", "grad_norm"):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_an_error_on_rank_0_stops_every_rank(tmp_path: Path) -> None:
    """Rank 0 alone prepares the run folder and tokenizes first; when it fails, the other rank gets
    the same error instead of waiting at the next collective until the 30-minute timeout."""
    model = tiny_model(tmp_path / "model")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "1+1=", "chosen": "2."}\n', encoding="utf-8")  # no rejected
    args = ["train", "dpo", "--model", str(model), "--data", str(bad), "--max-steps", "1", "--no-progress"]
    proc = run_torchrun([*args, "--out", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "c")])
    assert proc.returncode != 0
    assert proc.stderr.count("bad.jsonl:1") >= 2, proc.stderr[-2000:]  # both ranks name the row
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "metrics.jsonl").write_text("{}\n")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(4))
    args[args.index(str(bad))] = str(data)
    proc = run_torchrun([*args, "--out", str(tmp_path / "taken"), "--cache-dir", str(tmp_path / "c")])
    assert proc.returncode != 0
    assert proc.stderr.count("already has a run") == 2, proc.stderr[-2000:]
