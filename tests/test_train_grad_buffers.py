"""Gradient buffers between optimizer steps: an offline run with gradient accumulation zeroes its
gradients in place (its later micro-batches hold them anyway, so the peak does not move, and the next
step neither maps fresh buffers nor zero-fills them); one micro-batch per step, or an online run
(whose next batch is generated first), frees them. Either way the weights are those of the other
path to float32 rounding."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import preftune.train.run as run_module
from online_fixtures import online_root
from preftune.cli import main
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("grad_buffers")
    tiny_model(root / "model")
    write_jsonl(root / "pairs.jsonl", pair_rows(12))
    return root


def _zero_grad_calls(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """The `set_to_none` of every optimizer.zero_grad call from now on."""
    calls: list[bool] = []
    original = torch.optim.Optimizer.zero_grad

    def recording(self: torch.optim.Optimizer, set_to_none: bool = True) -> None:
        calls.append(set_to_none)
        original(self, set_to_none)

    monkeypatch.setattr(torch.optim.Optimizer, "zero_grad", recording)
    return calls


def _dpo(root: Path, out: str, micro: int) -> dict[str, torch.Tensor]:
    args = [
        "train", "dpo", "--model", str(root / "model"), "--data", str(root / "pairs.jsonl"),
        "--cache-dir", str(root / "cache"), "--batch-size", "4", "--micro-batch-size", str(micro),
        "--max-steps", "3", "--lr", "1e-3", "--no-progress", "--no-report", "--out", str(root / out),
    ]  # fmt: skip
    assert main(args) == 0
    return load_file(str(root / out / "final" / "model.safetensors"))


def test_accumulating_offline_steps_keep_their_gradients_zeroed(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _zero_grad_calls(monkeypatch)
    kept = _dpo(root, "kept", micro=1)
    assert calls == [False, False, False]  # 4 micro-batches per step: zeroed in place
    calls.clear()
    single = _dpo(root, "single", micro=4)
    assert calls == [True, True, True]  # one micro-batch per step: freed
    monkeypatch.setattr(run_module, "_KEEP_ACCUMULATED_GRADS", False)  # the benchmarks' `grads` lever
    calls.clear()
    freed = _dpo(root, "freed", micro=1)
    assert calls == [True, True, True]
    start = load_file(str(root / "model" / "model.safetensors"))
    assert any(not torch.equal(kept[k], start[k]) for k in kept)
    for k in kept:
        torch.testing.assert_close(kept[k], freed[k], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(kept[k], single[k], rtol=1e-5, atol=1e-6)


def test_online_steps_free_their_gradients(
    tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """GRPO with 8 samples per step in micro-batches of 2: the rollout of the next step runs with the
    gradients freed."""
    online = online_root(tmp_path_factory, "grad_buffers_online")
    calls = _zero_grad_calls(monkeypatch)
    args = [
        "train", "grpo", "--model", str(online / "model"), "--prompts", str(online / "prompts.jsonl"),
        "--reward", f"{online / 'rewards.py'}:digits", "--num-generations", "4", "--batch-size", "2",
        "--micro-batch-size", "2", "--max-completion-length", "4", "--max-steps", "2",
        "--no-progress", "--no-report", "--out", str(online / "run"),
    ]  # fmt: skip
    assert main(args) == 0
    assert calls and all(calls)
