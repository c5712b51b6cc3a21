"""Weights an optimizer step made non-finite stop the run before anything is saved (in `skip` mode too),
naming the real last good checkpoint; a full disk or a file-size limit while writing a checkpoint is
one named line, the partial folder is removed and the previous checkpoint still verifies; so is one
while writing the metrics log or final/ (which leaves no final.tmp/), and `--resume` then finishes."""

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
from test_train_fixtures import one_line, pair_rows, tiny_model, write_jsonl

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


def test_file_size_limit_while_writing_the_metrics_log(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """A file-size limit (as a full disk) that metrics.jsonl reaches in step 2: one line naming it
    (the flush that fails names no file) instead of a traceback; `--resume` starts over in the
    folder, dropping the partial last record."""
    from preftune.train.logging import MetricsLogger

    real, limits = MetricsLogger.truncate_after, resource.getrlimit(resource.RLIMIT_FSIZE)

    def limited(self: MetricsLogger, step: int) -> str | None:  # once the run folder is set up
        note = real(self, step)
        resource.setrlimit(resource.RLIMIT_FSIZE, (700, limits[1]))
        return note

    monkeypatch.setattr(MetricsLogger, "truncate_after", limited)
    out = env["root"] / "full-log"
    try:
        assert main([*env["args"], "--out", str(out), "--lr", "1e-3", "--save-every", "0"]) == 2
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, limits)
    assert one_line(capsys.readouterr().err) == (
        f"no space left on device while writing {out / 'metrics.jsonl'} (File too large); no checkpoint "
        "was written yet — free disk space (or raise the file-size limit), then rerun with --resume"
    )
    monkeypatch.setattr(MetricsLogger, "truncate_after", real)
    assert main([*env["args"], "--out", str(out), "--lr", "1e-3", "--save-every", "0", "--resume"]) == 0
    assert "dropped the partial last record" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").is_file()


def test_disk_full_while_writing_final(
    env: dict[str, Any], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """safetensors' own error for ENOSPC in final/'s weights: one line naming final/ and the last
    checkpoint; no final.tmp/ is left, and `--resume` from that checkpoint writes final/."""
    from safetensors import SafetensorError
    from transformers import PreTrainedModel

    def full(self: Any, folder: str, **kw: Any) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"partial")
        raise SafetensorError("Error while serializing: I/O error: No space left on device (os error 28)")

    with monkeypatch.context() as patch:
        patch.setattr(PreTrainedModel, "save_pretrained", full)
        out = env["root"] / "full-final"
        assert main([*env["args"], "--out", str(out), "--lr", "1e-3"]) == 2
    line = one_line(capsys.readouterr().err)
    assert line.startswith(f"no space left on device while writing {out / 'final'} (No space left")
    assert f"the newest checkpoint {out / 'checkpoints' / 'step-4'} is intact" in line
    assert sorted(p.name for p in out.iterdir()) == [".lock", "checkpoints", "config.yaml", "metrics.jsonl"]
    assert main([*env["args"], "--out", str(out), "--lr", "1e-3", "--resume"]) == 0
    assert (out / "final" / "model.safetensors").is_file()
