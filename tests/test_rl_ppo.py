"""PPO with a value head, MA-RLHF and RTO on a tiny model: MA with n = 1 is PPO exactly (loss and
gradients), RTO's token rewards sum to the DPO implicit reward, the value head is checkpointed and a
resumed run is bit-identical, presets and config errors (docs/online.md)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from online_fixtures import crash_in_call, digits_reward, online_root
from preftune.cli import main
from preftune.config import TrainConfig, validate
from preftune.errors import ConfigError
from preftune.losses.policy_losses import POLICY_LOSSES
from preftune.models.logprobs import example_stats
from preftune.reward import load_reward
from preftune.rl.phase import OnlinePhase
from preftune.rl.ppo import VALUE_HEAD_FILE, TokenCredit, attach_value_head, rto_token_rewards, value_head
from preftune.rl.prompts import load_prompts
from preftune.rl.sampling import Sampling
from preftune.train.distributed import World
from preftune.train.loop import Objective
from preftune.train.policy_step import policy_on_batch
from test_train_fixtures import tiny_model


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = online_root(tmp_path_factory, "ppo")
    tiny_model(root / "dpo", seed=1)  # another model stands in for a DPO model
    return root


def _load(folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder)


def _phase(root: Path, model: Any, credit: TokenCredit) -> OnlinePhase:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    phase = OnlinePhase(
        0, load_prompts(str(root / "prompts.jsonl"), tokenizer), 4, 4, 0, load_reward(digits_reward),
        tokenizer, "gae", 4, Sampling(max_new_tokens=8), credit=credit,
    )  # fmt: skip
    phase.attach(model)
    return phase


def _objective() -> Objective:
    terms = [(POLICY_LOSSES[n], 1.0, POLICY_LOSSES[n].validate({})) for n in ("ppo_clip", "value")]
    return Objective(terms, "policy")


def _step(model: Any, batch: list[Any]) -> tuple[dict[str, float], torch.Tensor]:
    model.zero_grad()
    sums = policy_on_batch(
        model, batch, objective=_objective(), reference=None, world=World(), micro_batch_size=3, backward=True
    ).result()
    return sums, torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])


def test_ma_ppo_with_one_token_macros_is_ppo_exactly(root: Path) -> None:
    model = _load(root / "model")
    head = attach_value_head(model)
    with torch.no_grad():  # a non-zero critic, so that values enter the advantages
        head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(0))
        head.bias.fill_(0.3)
    ppo = TokenCredit(_load(root / "model"), kl_coef=0.1, lam=0.9)
    batches = [_phase(root, model, c).batch(0) for c in (ppo, replace(ppo, macro="fixed", macro_n=1))]
    for a, b in zip(*batches):
        assert a.response_ids == b.response_ids
        for key in ("advantages", "values", "returns"):
            assert torch.equal(a.meta[key], b.meta[key]), key
    (loss_a, grad_a), (loss_b, grad_b) = _step(model, batches[0]), _step(model, batches[1])
    assert loss_a == loss_b and torch.equal(grad_a, grad_b)
    assert loss_a["ratio"] == pytest.approx(1.0, abs=1e-5)  # on-policy
    # macros of 5 tokens change the advantages (the same rollouts)
    ma = _phase(root, model, replace(ppo, macro="fixed", macro_n=5)).batch(0)
    assert not all(torch.equal(x.meta["advantages"], y.meta["advantages"]) for x, y in zip(ma, batches[0]))


def test_value_term_is_clipped_around_the_rollout_values(root: Path) -> None:
    from preftune.losses.policy_losses import PolicyBatch

    values = torch.tensor([[1.0, 0.5]], requires_grad=True)
    batch = PolicyBatch(
        torch.zeros(1, 2), torch.tensor([[True, True]]), torch.zeros(1),
        values=values, old_values=torch.tensor([[0.0, 0.0]]), returns=torch.tensor([[2.0, 0.0]]),
    )  # fmt: skip
    out = POLICY_LOSSES["value"].fn(batch, {}, vf_coef=0.1, cliprange_value=0.2, aggregation="token_mean")
    # token 0: max((1−2)², (0.2−2)²) = 3.24; token 1: max(0.25, 0.04) = 0.25; × ½ × 0.1
    assert float(out.losses.detach()[0]) == pytest.approx(0.05 * (3.24 + 0.25))
    out.losses.sum().backward()
    assert values.grad is not None  # token 0's clipped branch is flat in V: its gradient is 0
    torch.testing.assert_close(values.grad, torch.tensor([[0.0, 0.05 * 2 * 0.5]]))


def test_rto_token_rewards_sum_to_the_dpo_implicit_reward(root: Path) -> None:
    policy, dpo = _load(root / "model"), _load(root / "dpo")
    attach_value_head(policy)
    examples = _phase(root, policy, TokenCredit(_load(root / "model"), kl_coef=0.0)).batch(0)
    with torch.no_grad():
        stats = [example_stats(m, examples, token_logps=True) for m in (dpo, policy)]
    mask = torch.arange(stats[0].token_logps.shape[1])[None, :] < stats[0].lengths[:, None]
    r = rto_token_rewards(stats[0].token_logps, stats[1].token_logps, mask, scale=0.1, clip=float("inf"))
    implicit = 0.1 * (stats[0].logps - stats[1].logps)  # β log π_dpo(y)/π_ref(y), β = s
    torch.testing.assert_close(r.sum(dim=1), implicit, rtol=1e-5, atol=1e-6)
    clipped = rto_token_rewards(stats[0].token_logps, stats[1].token_logps, mask, scale=0.1, clip=0.01)
    assert float(clipped.abs().max()) <= 0.01 and float(clipped.abs().max()) > 0
    # in the credit: with kl_coef 0 and a zero reward the GAE(1, 1) return at token 0 is the sum
    model = _load(root / "model")
    attach_value_head(model)
    credit = TokenCredit(_load(root / "model"), kl_coef=0.0, lam=1.0, dpo=dpo, dpo_clip=1e9, whiten=False)
    phase = _phase(root, model, credit)
    phase.reward = load_reward(lambda prompts, completions, **kw: [0.0] * len(completions))
    batch = phase.batch(0)
    returns = torch.cat([e.meta["returns"][:, 0] for e in batch])
    dpo_stats = example_stats(dpo, batch, temperature=1.0)
    ref_stats = example_stats(model, batch, temperature=1.0)
    torch.testing.assert_close(returns, 0.05 * (dpo_stats.logps - ref_stats.logps), rtol=1e-4, atol=1e-5)


def _args(root: Path, method: str = "ppo") -> list[str]:
    return [
        "train", method, "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:digits", "--num-generations", "2", "--batch-size", "4",
        "--max-completion-length", "5", "--max-steps", "4", "--save-every", "2", "--lr", "3e-3",
        "--value-lr", "1e-2", "--no-progress", "--no-report",
    ]  # fmt: skip


def test_ppo_value_head_is_checkpointed_and_resume_is_exact(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _args(root)
    assert main([*args, "--out", str(root / "whole")]) == 0
    crash_in_call(monkeypatch, 3, lambda: main([*args, "--out", str(root / "stopped")]))
    saved = load_file(str(root / "stopped" / "checkpoints" / "step-2" / "model.safetensors"))
    assert "preftune_value_head.weight" in saved and bool(saved["preftune_value_head.weight"].abs().sum() > 0)
    assert main([*args, "--out", str(root / "stopped"), "--resume"]) == 0
    for name in ("model.safetensors", VALUE_HEAD_FILE):
        expected = load_file(str(root / "whole" / "final" / name))
        resumed = load_file(str(root / "stopped" / "final" / name))
        assert expected.keys() == resumed.keys()
        assert all(torch.equal(expected[k], resumed[k]) for k in expected), name
    final = load_file(str(root / "whole" / "final" / "model.safetensors"))
    assert not any("value_head" in k for k in final)  # final/ is a plain causal LM
    assert value_head(_load(root / "whole" / "final")) is None
    rows = [json.loads(line) for line in (root / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert rows[0]["kl"] == pytest.approx(0.0, abs=1e-6) and rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5)
    assert rows[0]["value"] == 0.0  # a zero-initialised head
    assert all(k in rows[-1] for k in ("loss/ppo_clip", "loss/value", "returns", "non_score_reward"))
    scheduler = json.loads((root / "whole" / "checkpoints" / "step-4" / "scheduler.json").read_text())
    assert scheduler["value"]["base_lrs"] == [3e-3, 1e-2]  # the value head's own param group


def _config(**kw: Any) -> TrainConfig:
    base = {"method": "ppo", "model": "m", "prompts": "p.jsonl", "reward": "arithmetic", "out": "o"}
    return TrainConfig(**{**base, **kw})


def test_ppo_presets_and_config_errors() -> None:
    from preftune.online_methods import PRESETS, expand

    for method in ("ppo", "ma_ppo", "rto"):
        assert expand(method, None, None)[:2] == ("gae", "ppo_clip:1,value:1")
    assert PRESETS["ma_ppo"].macro == "fixed" and PRESETS["ppo"].macro is None
    objective = validate(_config(hparams={"vf_coef": 0.5, "cliprange_value": 0.1}))
    assert objective[1][2] == {"vf_coef": 0.5, "cliprange_value": 0.1, "aggregation": "token_mean"}
    with pytest.raises(ConfigError, match="method 'rto' needs dpo_model"):
        validate(_config(method="rto"))
    with pytest.raises(ConfigError, match="value head needs full fine-tuning"):
        validate(_config(lora=True))
    with pytest.raises(ConfigError, match="^--value-lr: read only by the PPO family"):
        validate(_config(method="rloo", value_lr=1e-3))
    with pytest.raises(ConfigError, match="^--macro: read only by the PPO family"):
        validate(_config(method="grpo", macro="fixed"))
    with pytest.raises(ConfigError, match="'macro' = 'fix' is not one of"):
        validate(_config(macro="fix"))
    with pytest.raises(ConfigError, match="loss 'value' needs the value head"):
        from preftune.losses.policy_losses import PolicyBatch

        batch = PolicyBatch(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool), torch.zeros(1))
        POLICY_LOSSES["value"].fn(batch, {}, vf_coef=0.1, cliprange_value=0.2, aggregation="token_mean")
