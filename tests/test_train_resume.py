"""`--resume` is exact: a run killed with SIGKILL mid-training (in step 4; step 3's work is lost, the
step-2 checkpoint is the newest) and resumed ends with bit-identical final weights to an uninterrupted run. The loss is
BCO, whose running δ is checkpointed loss state; the reference comes from the on-disk cache."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

from preftune.cli import main
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

# Runs `preftune train` and SIGKILLs itself when step 4 starts.
DRIVER = """
import os, signal, sys
import preftune.train.api as api
real, calls = api.objective_on_batch, {"n": 0}
def killing(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
api.objective_on_batch = killing
from preftune.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_sigkill_then_resume_equals_uninterrupted(tmp_path: Path) -> None:
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    args = [
        "train",
        "bco",
        "--model",
        str(model),
        "--data",
        str(data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "4",
        "--micro-batch-size",
        "2",
        "--max-steps",
        "5",
        "--save-every",
        "2",
        "--lr",
        "3e-3",
        "--warmup-steps",
        "2",
        "--scheduler",
        "cosine",
        "--no-progress",
    ]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args, "--out", str(killed)],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed by SIGKILL, not finished
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["step-2"]
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 3  # steps 1-3 ran
    assert not (killed / "final").exists()

    assert main([*args, "--out", str(killed), "--resume"]) == 0
    whole = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(killed / "final" / "model.safetensors"))
    start = load_file(str(model / "model.safetensors"))
    assert whole.keys() == resumed.keys()
    for k in whole:
        assert torch.equal(whole[k], resumed[k]), k
    assert any(not torch.equal(whole[k], start[k]) for k in whole)
    steps = [json.loads(line)["step"] for line in (killed / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # step 3 was redone after the resume and is logged once
