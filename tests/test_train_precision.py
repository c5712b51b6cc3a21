"""Mixed precision (`mixed_precision: bf16`): float32 weights and optimizer, bfloat16 compute, and a
reference computed the same way (so the implicit reward starts at exactly 0, as in full precision)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from safetensors.torch import load_file

from preftune.config import TrainConfig, validate
from preftune.errors import ConfigError
from preftune.train.api import train
from test_train_fixtures import pair_rows, tiny_model, write_jsonl


def _run(tmp_path: Path, name: str, **extra: object) -> list[dict]:
    model = tiny_model(tmp_path / "model")
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows(16))
    config = TrainConfig(
        method="dpo", model=str(model), data=str(data), out=str(tmp_path / name), max_steps=8,
        batch_size=4, lr=3e-3, progress=False, cache_dir=str(tmp_path / "cache"), **extra,  # type: ignore[arg-type]
    )  # fmt: skip
    train(config)
    return [json.loads(x) for x in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_bf16_trains_float32_weights_against_a_bf16_reference(tmp_path: Path) -> None:
    full = _run(tmp_path, "fp32")
    mixed = _run(tmp_path, "bf16", mixed_precision="bf16")
    # step 1: policy = reference, both computed in bf16 and in the same micro-batches (the reference's
    # groups are the first epoch's batches), so every log-ratio is exactly 0: loss = log 2 in float32
    # (1.9e-9 from the float64 value), margin 0. A float32 reference against the bf16 policy gave
    # −3.3e-5 and 6.5e-5.
    assert mixed[0]["loss"] == pytest.approx(math.log(2), abs=1e-8)
    assert mixed[0]["rewards/margin"] == 0.0
    # bf16 compute is really on: the log-probs differ from float32 by rounding, not more
    a, b = full[0]["logps/chosen"], mixed[0]["logps/chosen"]
    assert a != b and b == pytest.approx(a, rel=5e-2)
    assert mixed[-1]["loss"] < mixed[0]["loss"] - 0.05  # it learns
    weights = load_file(str(tmp_path / "bf16" / "final" / "model.safetensors"))
    assert {str(t.dtype) for t in weights.values()} == {"torch.float32"}
    # the bf16 reference has its own cache entry beside the float32 one
    assert len([p for p in (tmp_path / "cache" / "reference").iterdir() if p.is_dir()]) == 2


def test_bf16_mixed_precision_needs_float32_weights() -> None:
    config = TrainConfig(method="dpo", model="m", data="d", out="o", mixed_precision="bf16", dtype="bfloat16")
    with pytest.raises(ConfigError, match="set dtype=float32"):
        validate(config)
