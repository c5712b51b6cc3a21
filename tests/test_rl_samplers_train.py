"""Samplers inside `preftune train`: presets, the pool baseline of Reinforce-Ada through the online
phase, and a stateful sampler's exact resume (docs/online.md, Samplers)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from online_fixtures import crash_in_call, online_root, parity_reward
from preftune.cli import main
from preftune.config import TrainConfig, resolve_objective, validate
from preftune.errors import ConfigError
from preftune.online_methods import expand, preset_sampler
from preftune.reward import load_reward
from preftune.rl import make_sampler
from preftune.rl.phase import OnlinePhase
from preftune.rl.prompts import load_prompts
from preftune.rl.sampling import Sampling


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return online_root(tmp_path_factory, "samplers")


def test_reinforce_ada_in_the_phase_uses_the_pool_mean_baseline(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    prompts = load_prompts(str(root / "prompts.jsonl"), tokenizer)
    sampler = make_sampler("reinforce_ada", {"rounds": 2, "per_round": 4, "keep": 2}, prompts=len(prompts))
    phase = OnlinePhase(
        0, prompts, 2, 4, 0, load_reward(parity_reward), tokenizer, "global_mean", 8,
        Sampling(max_new_tokens=4), sampler=sampler,
    )  # fmt: skip
    phase.attach(model)
    batch = phase.batch(0)
    assert batch and all(len(e.response_ids) == 2 for e in batch)  # each pool cut to keep = 2
    assert phase.metrics["zero_signal_fraction"] == 0.0
    assert phase.metrics["completions"] >= 16  # round 1: 4 prompts × 4
    for example in batch:
        rewards = example.meta["rewards"]
        assert sorted(rewards.tolist()) == [0.0, 1.0]  # balanced
        adv = example.meta["advantages"]
        pool_mean = float(rewards[0] - adv[0])  # A = r − mean(pool), the same mean for both
        assert float(rewards[1] - adv[1]) == pytest.approx(pool_mean, abs=1e-6)
        assert 0.0 < pool_mean < 1.0


def _config(**kw: Any) -> TrainConfig:
    base = {"method": "grpo", "model": "m", "prompts": "p.jsonl", "reward": "arithmetic", "out": "o"}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("method", "estimator", "sampler"),
    [("dapo", "grpo", "dapo_filter"), ("reinforce_ada", "global_mean", "reinforce_ada"),
     ("gvm", "positive_only", "gvm"), ("vade", "grpo", "vade"), ("grpo", "grpo", "uniform")],
)  # fmt: skip
def test_sampler_presets(method: str, estimator: str, sampler: str) -> None:
    assert expand(method, None, None)[0] == estimator
    assert preset_sampler(method, None, None) == (sampler, {})
    objective = validate(_config(method=method))
    assert objective[0][0].name == "ppo_clip"
    assert objective[0][2]["eps_high"] == (0.28 if method == "dapo" else 0.2)  # DAPO's clip-higher


def test_sampler_flags_are_checked_before_the_run() -> None:
    assert preset_sampler("grpo", "reinforce_ada", {"exit": "pos"}) == ("reinforce_ada", {"exit": "pos"})
    with pytest.raises(ConfigError, match="unknown sampler 'gvn' — did you mean 'gvm'"):
        validate(_config(sampler="gvn"))
    with pytest.raises(ConfigError, match="sampler 'vade': unknown option 'decya'"):
        validate(_config(sampler="vade", sampler_args={"decya": 0.5}))
    with pytest.raises(ConfigError, match="--sampler: for the online methods"):
        validate(TrainConfig(method="dpo", model="m", data="d", out="o", sampler="vade"))
    assert resolve_objective(_config(sampler="vade"))[0][0].name == "ppo_clip"


def _args(root: Path) -> list[str]:
    return [
        "train", "grpo", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:parity", "--num-generations", "4", "--batch-size", "3",
        "--max-completion-length", "4", "--max-steps", "4", "--save-every", "2", "--lr", "3e-3",
        "--sampler", "vade", "--sampler-args", '{"pool": 2, "decay": 0.8}', "--no-progress", "--no-report",
    ]  # fmt: skip


def test_vade_stopped_then_resumed_equals_uninterrupted(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _args(root)
    assert main([*args, "--out", str(root / "whole")]) == 0
    crash_in_call(monkeypatch, 3, lambda: main([*args, "--out", str(root / "stopped")]))
    saved = load_file(str(root / "stopped" / "checkpoints" / "step-2" / "sampler.safetensors"))
    assert float((saved["alpha"] + saved["beta"]).max()) > 2.0  # two steps of counts, not the prior
    assert main([*args, "--out", str(root / "stopped"), "--resume"]) == 0
    expected = load_file(str(root / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(root / "stopped" / "final" / "model.safetensors"))
    for k in expected:
        assert torch.equal(expected[k], resumed[k]), k
    rows = [json.loads(line) for line in (root / "whole" / "metrics.jsonl").read_text().splitlines()]
    again = [json.loads(line) for line in (root / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in again] == [r["reward"] for r in rows]
    assert all(r["sampler/candidates"] == 6.0 for r in rows)  # pool 2 × batch 3
    final = load_file(str(root / "whole" / "checkpoints" / "step-4" / "sampler.safetensors"))
    assert torch.equal(
        final["alpha"],
        load_file(str(root / "stopped" / "checkpoints" / "step-4" / "sampler.safetensors"))["alpha"],
    )
