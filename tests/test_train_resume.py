"""`--resume` is exact: a run stopped in step 4 (step 3's work lost, the step-2 checkpoint the newest)
and resumed ends with bit-identical final weights to an uninterrupted run. The loss is BCO, whose
running δ is checkpointed loss state; the reference comes from the on-disk cache; cosine schedule with
warmup. Stopped two ways: an exception inside the step (fast, default suite) and SIGKILL of a
subprocess (slow: a second interpreter)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from online_fixtures import crash_in_call
from preftune.cli import main
from test_train_fixtures import assert_resume_refuses_data, pair_rows, tiny_model, write_jsonl

# Runs `preftune train` and SIGKILLs itself when step 4 starts.
DRIVER = """
import os, signal, sys
import preftune.train.api as api
import preftune.train.run as train_run
real, calls = train_run.objective_on_batch, {"n": 0}
def killing(*args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 4:
        os.kill(os.getpid(), signal.SIGKILL)
    return real(*args, **kwargs)
train_run.objective_on_batch = killing
from preftune.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[str]]:
    root = tmp_path_factory.mktemp("resume")
    model = tiny_model(root / "model")
    data = write_jsonl(root / "pairs.jsonl", pair_rows(24))
    args = [
        "train",
        "bco",
        "--model",
        str(model),
        "--data",
        str(data),
        "--cache-dir",
        str(root / "cache"),
        "--batch-size",
        "4",
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
    assert main([*args, "--out", str(root / "whole")]) == 0
    return root, args


def check_resumed(root: Path, args: list[str], out: Path) -> None:
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-2"]
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 3  # steps 1-3 ran
    assert not (out / "final").exists()
    assert main([*args, "--out", str(out), "--resume"]) == 0
    expected = load_file(str(root / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(out / "final" / "model.safetensors"))
    start = load_file(str(root / "model" / "model.safetensors"))
    assert expected.keys() == resumed.keys()
    for k in expected:
        assert torch.equal(expected[k], resumed[k]), k
    assert any(not torch.equal(expected[k], start[k]) for k in expected)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4, 5]  # step 3 was redone after the resume and is logged once
    state = json.loads((out / "checkpoints" / "step-5" / "trainer_state.json").read_text())
    assert state["step"] == 5 and state["phase"] == 1 and state["step_in_phase"] == 0  # run finished


def test_interrupted_then_resume_equals_uninterrupted(
    whole: tuple[Path, list[str]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, args = whole
    crash_in_call(monkeypatch, 4, lambda: main([*args, "--out", str(root / "stopped")]))
    check_resumed(root, args, root / "stopped")


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted(whole: tuple[Path, list[str]]) -> None:
    root, args = whole
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    proc = subprocess.run(
        [sys.executable, "-c", DRIVER, *args, "--out", str(root / "killed")],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, proc.stderr[-2000:]  # killed by SIGKILL, not finished
    check_resumed(root, args, root / "killed")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "extra", "ranked"),
    [
        ("tr_dpo", ["--ref-sync-every", "2", "--ref-sync-alpha", "0.5"], False),
        ("apo", ["--rounds", "2", "--apo-alpha", "0.5"], False),
        ("curry", ["--stages", "2"], True),
    ],
)
def test_moving_references_resume_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, extra: list[str], ranked: bool
) -> None:
    """Stopped in the second phase (or after a TR-DPO sync): the checkpoint's reference weights /
    cache fingerprint and the round-start weights (Accelerated PO) rebuild the same run."""
    from test_train_fixtures import ranked_rows

    model = tiny_model(tmp_path / "model")
    rows = ranked_rows(12) if ranked else pair_rows(24)
    data = write_jsonl(tmp_path / "data.jsonl", rows)
    args = [
        "train",
        "dpo",
        "--model",
        str(model),
        "--data",
        str(data),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--batch-size",
        "4",
        "--max-steps",
        "6",
        "--save-every",
        "2",
        "--lr",
        "3e-3",
        "--no-progress",
        *extra,
    ]
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    crash_in_call(monkeypatch, 6, lambda: main([*args, "--out", str(tmp_path / "stopped")]))
    assert main([*args, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    expected = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    for k in expected:
        assert torch.equal(expected[k], resumed[k]), k


def test_gradient_accumulation_with_a_tied_head_resumes_exactly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Micro-batches of 1 in batches of 4 keep the gradient buffers (zeroed) between steps, and the
    tied embedding/head weight's gradient is added into its buffer in another order than a fresh one
    is formed (float32 rounding): the checkpoint records which buffers were held, so the first step
    after a resume adds as the uninterrupted run's step did."""
    model = tiny_model(tmp_path / "model", arch="qwen2")  # tied input/output embeddings
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(24))
    args = ["train", "dpo", "--model", str(model), "--data", str(data), "--cache-dir", str(tmp_path / "c"),
            "--batch-size", "4", "--micro-batch-size", "1", "--max-steps", "5", "--save-every", "2",
            "--lr", "3e-3", "--no-progress"]  # fmt: skip
    assert main([*args, "--out", str(tmp_path / "whole")]) == 0
    crash_in_call(monkeypatch, 4, lambda: main([*args, "--out", str(tmp_path / "stopped")]))
    state = json.loads((tmp_path / "stopped" / "checkpoints" / "step-2" / "trainer_state.json").read_text())
    assert state["grads_held"]  # every trainable weight's buffer
    assert main([*args, "--out", str(tmp_path / "stopped"), "--resume"]) == 0
    expected = load_file(str(tmp_path / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "stopped" / "final" / "model.safetensors"))
    assert [k for k in expected if not torch.equal(expected[k], resumed[k])] == []


def test_data_changed_under_its_path_is_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The data file rewritten between a stop and `--resume` (same path, other rows): refused in one
    line naming the file and the checkpoint, before anything is written; put back, the run resumes."""
    model = tiny_model(tmp_path / "model")
    rows = pair_rows(24)
    data = write_jsonl(tmp_path / "pairs.jsonl", rows)
    out = tmp_path / "run"
    args = ["train", "dpo", "--model", str(model), "--data", str(data), "--cache-dir", str(tmp_path / "c"),
            "--batch-size", "4", "--max-steps", "3", "--save-every", "2", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert main(args) == 0
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-3")
    write_jsonl(data, rows[:12])
    assert_resume_refuses_data(main, capsys, args, out, "data", data, out / "checkpoints" / "step-2")
    write_jsonl(data, rows)
    assert main([*args, "--resume"]) == 0
