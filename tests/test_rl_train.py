"""`preftune train grpo` and the other online presets: the online phase, the policy step, presets,
prompt validation and exact resume (docs/online.md)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from online_fixtures import crash_in_call, digits_reward, online_root
from preftune.cli import main
from preftune.config import TrainConfig, reference_strategy, resolve_objective, validate
from preftune.errors import ConfigError, DataError
from preftune.losses.policy_losses import POLICY_LOSSES
from preftune.reward import load_reward
from preftune.rl.phase import OnlinePhase, generation_seed
from preftune.rl.prompts import load_prompts
from preftune.rl.sampling import Sampling
from preftune.train.distributed import World
from preftune.train.loop import Objective
from preftune.train.policy_step import policy_on_batch
from preftune.train.runfolder import RESUME_SAFE
from test_train_fixtures import write_jsonl


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return online_root(tmp_path_factory, "grpo")


def _phase(root: Path, model: Any, tokenizer: Any, **kw: Any) -> OnlinePhase:
    phase = OnlinePhase(
        0, load_prompts(str(root / "prompts.jsonl"), tokenizer), 4, 4, 0, load_reward(digits_reward),
        tokenizer, kw.pop("estimator", "grpo"), 4, Sampling(max_new_tokens=5, top_k=kw.pop("top_k", 0)),
    )  # fmt: skip
    phase.attach(model)
    return phase


def _objective(text: str) -> Objective:
    terms = [(POLICY_LOSSES[n], 1.0, POLICY_LOSSES[n].validate({})) for n in text.split(",")]
    return Objective(terms, "policy")


def test_on_policy_ratio_is_one_and_ppo_clip_gradient_equals_pg(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    phase = _phase(root, model, tokenizer, top_k=20)  # a cut support: the trainer renormalises too
    batch = phase.batch(0)
    assert [len(e.response_ids) for e in batch] == [4] * 4  # one example per prompt, K = G = 4
    assert batch[0].meta["advantages"].abs().sum() > 0  # the reward has signal
    grads, sums = [], []
    for text in ("ppo_clip", "pg"):
        model.zero_grad()
        out = policy_on_batch(
            model, batch, objective=_objective(text), reference=None, world=World(),
            micro_batch_size=3, backward=True,
        )  # fmt: skip
        sums.append(out.result())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert sums[0]["ratio"] == pytest.approx(1.0, abs=1e-5)  # the engine's log-probs, recomputed
    assert torch.allclose(grads[0], grads[1], atol=1e-6, rtol=1e-5)  # at ρ = 1: ∇ppo_clip = ∇pg
    # token mean of −ρA = −A at ρ = 1: the advantage-weighted token count over all tokens
    adv = torch.cat([e.meta["advantages"] for e in batch])
    lengths = torch.tensor([len(r) for e in batch for r in e.response_ids], dtype=torch.float32)
    assert sums[0]["loss"] == pytest.approx(float(-(adv * lengths).sum() / lengths.sum()), abs=1e-6)


def test_rollouts_depend_on_seed_and_step_only(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    a, b = _phase(root, model, tokenizer), _phase(root, model, tokenizer)
    b.batch(0)  # another step drawn first changes nothing
    first, again = a.batch(1), b.batch(1)
    assert [e.response_ids for e in first] == [e.response_ids for e in again]
    assert generation_seed(0, 0, 1) != generation_seed(0, 0, 2) != generation_seed(1, 0, 2)
    assert set(a.metrics) >= {"reward", "zero_signal_fraction", "completion_length", "rollout_s"}


def _args(root: Path) -> list[str]:
    return [
        "train", "grpo", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:digits", "--num-generations", "4", "--batch-size", "4",
        "--max-completion-length", "5", "--max-steps", "4", "--save-every", "2", "--lr", "3e-3",
        "--objective", "ppo_clip:1,kl:0.05", "--no-progress", "--no-report",
    ]  # fmt: skip


def test_grpo_stopped_then_resumed_equals_uninterrupted(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _args(root)
    assert main([*args, "--out", str(root / "whole")]) == 0
    crash_in_call(monkeypatch, 3, lambda: main([*args, "--out", str(root / "stopped")]))
    assert sorted(p.name for p in (root / "stopped" / "checkpoints").iterdir()) == ["step-2"]
    assert main([*args, "--out", str(root / "stopped"), "--resume"]) == 0
    expected = load_file(str(root / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(root / "stopped" / "final" / "model.safetensors"))
    start = load_file(str(root / "model" / "model.safetensors"))
    for k in expected:
        assert torch.equal(expected[k], resumed[k]), k
    assert any(not torch.equal(expected[k], start[k]) for k in expected)
    rows = [json.loads(line) for line in (root / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for key in ("reward", "zero_signal_fraction", "kl", "completion_length", "rollout_s", "train_s"):
        assert all(key in r for r in rows), key
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6)  # step 1: the policy is the reference
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    again = [json.loads(line) for line in (root / "stopped" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in again] == [r["reward"] for r in rows]  # the same rollouts


def test_prompt_file_with_a_bad_row_names_path_row_field(root: Path) -> None:
    from transformers import AutoTokenizer

    bad = write_jsonl(root / "bad.jsonl", [{"prompt": "1+1="}, {"question": "2+2="}, {"prompt": 3}])
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    with pytest.raises(DataError) as err:
        load_prompts(str(bad), tokenizer)
    text = str(err.value)
    assert f"{bad}:2: field 'prompt': missing" in text
    assert f"{bad}:3: field 'prompt': is an int, not text or a message list" in text
    rows = load_prompts(str(root / "prompts.jsonl"), tokenizer)
    assert rows[1].text == "0+1=" and rows[1].columns == {"answer": 1} and rows[1].row == 2


def _config(**kw: Any) -> TrainConfig:
    base = {"method": "grpo", "model": "m", "prompts": "p.jsonl", "reward": "arithmetic", "out": "o"}
    return TrainConfig(**{**base, **kw})


@pytest.mark.parametrize(
    ("method", "terms", "aggregation"),
    [
        ("grpo", ["ppo_clip"], "token_mean"),
        ("dr_grpo", ["ppo_clip"], "seq_mean_token_sum_norm"),
        ("rloo", ["ppo_clip"], "token_mean"),
        ("remax", ["pg"], "token_mean"),
        ("reinforce_pp", ["ppo_clip"], "token_mean"),
        ("bnpo", ["ppo_clip"], "token_mean"),
    ],
)
def test_presets_expand_to_estimator_and_objective(method: str, terms: list[str], aggregation: str) -> None:
    from preftune.online_methods import expand

    objective = validate(_config(method=method))
    assert [s.name for s, _, _ in objective] == terms
    assert objective[0][2]["aggregation"] == aggregation
    assert expand(method, None, None)[0] == method
    assert expand(method, None, None)[3] == (method == "remax")  # ReMax's greedy baseline
    assert reference_strategy(_config(method=method), False) == "none"  # β = 0: no reference


def test_preset_parts_are_overridable_and_reference_choice() -> None:
    config = _config(method="dr_grpo", estimator="rloo", objective="ppo_clip:1,kl:0.01")
    objective = resolve_objective(config)
    assert [(s.name, w) for s, w, _ in objective] == [("ppo_clip", 1.0), ("kl", 0.01)]
    assert objective[0][2]["aggregation"] == "token_mean"  # the preset's default left with its objective
    assert reference_strategy(config, True) == "model"  # a frozen copy of the initial policy
    assert reference_strategy(_config(lora=True, objective="ppo_clip:1,kl:0.01"), True) == "adapter"
    with pytest.raises(ConfigError, match="reference cache keys fixed examples"):
        validate(_config(objective="ppo_clip:1,kl:0.01", reference="cache"))
    with pytest.raises(ConfigError, match="needs 'prompts'"):
        validate(_config(prompts=None))
    with pytest.raises(ConfigError, match="unknown estimator 'rlooo' — did you mean 'rloo'"):
        validate(_config(estimator="rlooo"))
    with pytest.raises(ConfigError, match="online methods"):
        validate(TrainConfig(method="dpo", model="m", data="d", out="o", reward="arithmetic"))
    config = _config(hparams={"eps_high": 0.28, "aggregation": "seq_mean_token_mean"})
    assert resolve_objective(config)[0][2]["eps_high"] == 0.28
    online = {
        "prompts",
        "reward",
        "num_generations",
        "estimator",
        "objective",
        "temperature",
        "top_p",
        "top_k",
    }
    assert not online & set(RESUME_SAFE)  # changing any of them refuses a resume
