"""Weights an optimizer step made non-finite stop the run before anything is saved (in `skip` mode too),
naming the real last good checkpoint; a full disk or a file-size limit while writing a checkpoint is
one named line, the partial folder is removed and the previous checkpoint still verifies."""

from __future__ import annotations

import errno
import os
import resource
from pathlib import Path
from typing import Any

import pytest
import torch

import preftune.train.api as api
from preftune.cli import main
from preftune.errors import TrainingError
from preftune.train import checkpoint as ckpt
from preftune.train import guards
from preftune.train.distributed import World
from preftune.train.guards import weights_finite
from preftune.train.integrity import verify
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    root = tmp_path_factory.mktemp("guards")
    args = [
        "train",
        "dpo",
        "--model",
        str(tiny_model(root / "model")),
        "--data",
        str(write_jsonl(root / "pairs.jsonl", pair_rows(16))),
        "--cache-dir",
        str(root / "cache"),
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--save-every",
        "1",
        "--keep-last",
        "4",
        "--no-progress",
    ]
    return {"root": root, "args": args}


@pytest.mark.parametrize("extremes", [True, False])
def test_weights_finite_sees_nan_and_inf(monkeypatch: pytest.MonkeyPatch, extremes: bool) -> None:
    """On CPU by each tensor's min and max (`extremes`), elsewhere by the max-|x| norm: the same
    verdicts, for float32 and bfloat16 weights and the largest finite values."""
    monkeypatch.setattr(guards, "_EXTREMES_ON_CPU", extremes)
    for dtype in (torch.float32, torch.bfloat16):
        big = torch.finfo(dtype).max
        params = [
            torch.nn.Parameter(torch.full((3, 4), -big, dtype=dtype)),
            torch.nn.Parameter(torch.zeros(0, dtype=dtype)),
            torch.nn.Parameter(torch.full((5,), big, dtype=dtype)),
        ]
        assert weights_finite(params, World())
        for bad in (float("nan"), float("inf"), -float("inf")):
            for p in (params[0], params[2]):
                kept = p.detach().clone()
                with torch.no_grad():
                    p.view(-1)[3] = bad
                assert not weights_finite(params, World()), (dtype, bad)
                with torch.no_grad():
                    p.copy_(kept)
            assert weights_finite(params, World())


def test_huge_lr_from_the_first_step_saves_nothing(
    env: dict[str, Any], capsys: pytest.CaptureFixture[str]
) -> None:
    """lr 1e39 (inf in float32) makes every weight non-finite in step 1 while its loss and gradient
    are finite; `on_nonfinite=skip` used to skip the later NaN losses and exit 0 with a NaN final/."""
    out = env["root"] / "huge"
    argv = [*env["args"], "--out", str(out), "--lr", "1e39", "--on-nonfinite", "skip"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert "the weights became non-finite in the optimizer step of step 1 (loss=0.6931" in err
    assert "cannot be un-stepped" in err and "no checkpoint was written yet" in err
    assert "\n" not in err
    assert not (out / "final").exists() and ckpt.list_checkpoints(out / "checkpoints") == []


def settings(env: dict[str, Any], out: str, **over: Any) -> Any:
    from preftune.config import load_config

    values = {
        "method": "dpo",
        "model": str(env["root"] / "model"),
        "data": str(env["root"] / "pairs.jsonl"),
        "cache_dir": str(env["root"] / "cache"),
        "out": str(env["root"] / out),
        "progress": False,
        "batch_size": 4,
        "max_steps": 4,
        "save_every": 1,
        "keep_last": 4,
        "lr": 1e-3,
    }
    return load_config(None, {**values, **over})


@pytest.mark.parametrize("mode", ["error", "skip"])
def test_lr_blowing_up_names_the_last_good_checkpoint(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, mode: str
) -> None:
    """The lr jumps ×1e42 in step 3: steps 1-2 are saved, step 3's weights are not finite, the error
    names step-2 and nothing after it is written (no step-3, no final/)."""
    monkeypatch.setattr(
        api,
        "build_scheduler",
        lambda opt, config, total: torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 if s < 2 else 1e42),
    )
    out = env["root"] / f"jump-{mode}"
    good = out / "checkpoints" / "step-2"
    with pytest.raises(
        TrainingError, match=rf"optimizer step of step 3 .*the last good checkpoint is {good}\."
    ):
        api.train(settings(env, f"jump-{mode}", on_nonfinite=mode))
    assert ckpt.list_checkpoints(out / "checkpoints") == [out / "checkpoints" / "step-1", good]
    assert not (out / "final").exists()
    verify(good)


def test_disk_full_while_writing_a_checkpoint(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """ENOSPC in the second checkpoint's optimizer file: one named line, no .tmp-* left, step-1 intact."""
    real, calls = ckpt.save_state, {"n": 0}

    def filling(obj: Any, folder: Path, name: str) -> list[str]:
        if name == "optimizer":
            calls["n"] += 1
            if calls["n"] == 2:
                (folder / "optimizer.safetensors").write_bytes(b"partial")
                raise OSError(errno.ENOSPC, "No space left on device")
        return real(obj, folder, name)

    monkeypatch.setattr(ckpt, "save_state", filling)
    out = env["root"] / "full"
    assert main([*env["args"], "--out", str(out), "--lr", "1e-3"]) == 2
    err = capsys.readouterr().err.strip()
    step1, step2 = out / "checkpoints" / "step-1", out / "checkpoints" / "step-2"
    assert err == (
        f"preftune: error: no space left on device while writing checkpoint {step2} (No space left on "
        f"device); removed the partial .tmp-step-2-{os.getpid()}/, the previous checkpoint "
        f"{step1} is intact — free disk space (or raise the file-size limit), then rerun with --resume"
    )
    assert [p.name for p in (out / "checkpoints").iterdir()] == ["step-1"]
    verify(step1)


def test_file_size_limit_while_writing_a_checkpoint(env: dict[str, Any]) -> None:
    """RLIMIT_FSIZE below the model file's size: safetensors' EFBIG is the same named error."""
    from preftune.models.load import load_causal_lm

    model = load_causal_lm(env["root"] / "model")
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: 1.0)
    root = env["root"] / "fsize" / "checkpoints"
    kw = {"model": model, "optimizer": optimizer, "scheduler": scheduler, "loss_state": {}, "keep_last": 3}
    first = ckpt.save_checkpoint(root, 1, trainer_state={}, **kw)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    resource.setrlimit(resource.RLIMIT_FSIZE, (10_000, hard))
    try:
        with pytest.raises(
            TrainingError,
            match=r"^no space left on device while writing checkpoint .*step-2 \(File too large\)",
        ):
            ckpt.save_checkpoint(root, 2, trainer_state={}, **kw)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
    assert [p.name for p in root.iterdir()] == ["step-1"]
    verify(first)
