"""Online runs' options: TRL GRPOConfig's names (beta, epsilon, epsilon_high, loss_type, scale_rewards)
and `num_iterations` μ > 1 (a batch of rollouts re-used for μ optimizer steps with the clipped ratio)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from online_fixtures import crash_in_call, digits_reward, online_root
from preftune.cli import build_parser, main
from preftune.config import config_from_dict, config_to_dict, load_config, resolve_objective, validate
from preftune.errors import ConfigError
from preftune.losses.policy_losses import POLICY_LOSSES
from preftune.models.logprobs import example_stats
from preftune.online_options import resolve_online
from preftune.reward import load_reward
from preftune.rl.phase import OnlinePhase, generation_seed
from preftune.rl.prompts import load_prompts
from preftune.rl.sampling import Sampling
from preftune.train.commands import overrides_from_args
from preftune.train.distributed import World
from preftune.train.loop import Objective
from preftune.train.policy_step import policy_on_batch


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return online_root(tmp_path_factory, "grpo_options")


def _config(method: str = "grpo", objective: str | None = None, **hparams: Any) -> Any:
    values = {"model": "m", "prompts": "p.jsonl", "reward": "arithmetic", "out": "o", "hparams": hparams}
    return config_from_dict({"method": method, "objective": objective, **values})


def _terms(config: Any) -> dict[str, tuple[float, dict[str, Any]]]:
    return {spec.name: (weight, hp) for spec, weight, hp in resolve_objective(config)}


def test_trl_names_become_the_terms_and_estimator_settings() -> None:
    terms = _terms(_config(beta=0.04, epsilon=0.1, epsilon_high=0.28, loss_type="grpo"))
    assert terms["ppo_clip"][1]["eps_low"] == 0.1 and terms["ppo_clip"][1]["eps_high"] == 0.28
    assert terms["kl"][0] == 0.04 and terms["kl"][1]["estimator"] == "k3"  # TRL's β: k3 in the loss
    assert {hp["aggregation"] for _, hp in terms.values()} == {"seq_mean_token_mean"}
    only = _terms(_config(epsilon=0.3, loss_type="dr_grpo"))["ppo_clip"][1]
    assert (only["eps_low"], only["eps_high"]) == (0.3, 0.3)  # TRL: epsilon_high defaults to epsilon
    assert only["aggregation"] == "seq_mean_token_sum_norm"
    assert set(_terms(_config(beta=0))) == {"ppo_clip"}  # β = 0: no KL term, no reference
    for given, scale in (("false", "none"), ("true", "group"), ("batch", "batch"), (False, "none")):
        online = resolve_online("grpo", None, None, {"scale_rewards": given})
        assert online.estimator_hparams == {"scale": scale, "eps": 1e-4}, given
    assert resolve_online("grpo", None, None, {"scale": "batch"}).estimator_hparams["scale"] == "batch"


@pytest.mark.parametrize(
    ("hparams", "message"),
    [
        ({"loss_type": "bnpo"}, "loss_type 'bnpo': TRL's bnpo divides by the tokens of each local batch"),
        ({"loss_type": "sigmoid"}, "loss_type 'sigmoid' is not a GRPO loss type here (known: grpo, dapo, dr_grpo)"),
        ({"loss_type": "dapo", "aggregation": "token_mean"}, "'loss_type' (TRL's name) and 'aggregation' both"),
        ({"epsilon": -0.1}, "'epsilon' = -0.1 must be a number ≥ 0 (TRL's GRPOConfig.epsilon)"),
        ({"epsilon": 0.1, "eps_low": 0.2}, "'epsilon' (TRL's name) and 'eps_low' both given; keep one"),
        ({"beta": "x"}, "'beta' = 'x' must be a number ≥ 0"),
        ({"beta": 0.1, "objective": "ppo_clip:1,kl:0.01"}, "'beta' = 0.1 and a kl term in objective"),
        ({"method": "remax", "epsilon": 0.1}, "'epsilon' is the clip range of ppo_clip; objective 'pg:1' has none"),
        ({"method": "rloo", "scale_rewards": "group"}, "scale_rewards is the grpo estimator's scaling; estimator 'rloo'"),
        ({"scale_rewards": "std"}, "scale_rewards = 'std': use group, batch or none"),
        ({"scale": "std"}, "estimator 'grpo': hyper-parameter 'scale' = 'std' is not one of the choices"),
    ],
)  # fmt: skip
def test_bad_online_options_are_one_line_errors(hparams: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as err:
        resolve_objective(_config(**hparams))
    assert message in str(err.value)


def _cli(*argv: str) -> Any:
    args = build_parser(["train", *argv]).parse_args(["train", *argv])
    return load_config(None, overrides_from_args(args))


def test_cli_accepts_trl_names_and_config_yaml_loads_back() -> None:
    base = ["grpo", "--model", "m", "--prompts", "p.jsonl", "--reward", "arithmetic", "--out", "o"]
    config = _cli(*base, "--loss_type", "dapo", "--beta", "0.04", "--epsilon", "0.1", "--epsilon_high",
                  "0.28", "--scale_rewards", "batch", "--num_generations", "4", "--num_iterations", "2",
                  "--top_k", "5", "--top_p", "0.9", "--temperature", "0.7", "--max_completion_length", "9")  # fmt: skip
    assert (config.num_generations, config.num_iterations, config.top_k) == (4, 2, 5)
    assert (config.top_p, config.temperature, config.max_completion_length) == (0.9, 0.7, 9)
    objective = validate(config)
    assert [(s.name, w) for s, w, _ in objective] == [("ppo_clip", 1.0), ("kl", 0.04)]
    again = config_from_dict(config_to_dict(config, objective))  # what config.yaml records
    assert [(s.name, w, hp) for s, w, hp in resolve_objective(again)] == [
        (s.name, w, hp) for s, w, hp in objective
    ]
    assert resolve_online("grpo", None, None, again.hparams).estimator_hparams["scale"] == "batch"
    with pytest.raises(ConfigError, match="'num_iterations' = 0 must be ≥ 1"):
        validate(_cli(*base, "--num_iterations", "0"))
    with pytest.raises(ConfigError, match="save_every = 3 must be a multiple of num_iterations = 2"):
        validate(_cli(*base, "--num_iterations", "2", "--save_every", "3"))
    with pytest.raises(ConfigError, match="--num-iterations: for the online methods"):
        validate(_cli("dpo", "--model", "m", "--data", "d.jsonl", "--out", "o", "--num_iterations", "2"))


def test_train_help_lists_the_online_trl_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = capsys.readouterr().out
    for flag in ("--epsilon_high", "--scale_rewards", "--num_iterations", "--loss_type", "--num_generations"):
        assert flag in text, flag
    assert "--beta B adds the term kl:B" in text


def _phase(root: Path, model: Any, tokenizer: Any, iterations: int) -> OnlinePhase:
    phase = OnlinePhase(
        0, load_prompts(str(root / "prompts.jsonl"), tokenizer), 4, 4, 0, load_reward(digits_reward),
        tokenizer, "grpo", 4, Sampling(max_new_tokens=5), iterations=iterations,
    )  # fmt: skip
    phase.attach(model)
    return phase


def _ppo(micro: Any, model: Any, backward: bool) -> dict[str, float]:
    spec = POLICY_LOSSES["ppo_clip"]
    objective = Objective([(spec, 1.0, spec.validate({}))], "policy")
    out = policy_on_batch(
        model, micro, objective=objective, reference=None, world=World(), micro_batch_size=2,
        backward=backward,
    )  # fmt: skip
    return out.result()


def test_num_iterations_reuses_the_rollouts_with_the_clipped_ratio(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    phase = _phase(root, model, tokenizer, iterations=2)
    first = phase.batch(0)
    assert _ppo(first, model, backward=True)["ratio"] == pytest.approx(1.0, abs=1e-5)
    with torch.no_grad():
        for p in model.parameters():
            p -= 3.0 * p.grad  # a large step, so that some ratios leave [1 − ε, 1 + ε]
    second = phase.batch(1)
    assert second is first and phase.metrics["rollout_s"] == 0.0  # the same rollouts, not resampled
    # PPO eq. 7 by hand: token mean of −min(ρA, clip(ρ, 0.8, 1.2)A), ρ against the sampling log-probs
    support = [e.meta["min_logits"] for e in second]
    with torch.no_grad():
        stats = example_stats(model, second, token_logps=True, temperature=1.0, min_logits=support)
    rows = [(lp, e.meta["old_logps"][i], e.meta["advantages"][i], len(r))
            for e, lps in zip(second, stats.token_logps.split([len(e.response_ids) for e in second]))
            for i, (lp, r) in enumerate(zip(lps, e.response_ids))]  # fmt: skip
    losses, ratios = [], []
    for lp, old, adv, n in rows:
        rho = torch.exp(lp[:n].double() - old[:n].double())
        ratios.append(rho)
        losses.append(torch.maximum(-rho * adv, -rho.clamp(0.8, 1.2) * adv))
    every = torch.cat(ratios)
    assert ((every < 0.8) | (every > 1.2)).any() and ((every > 0.8) & (every < 1.2)).any()
    result = _ppo(second, model, backward=False)
    assert abs(result["ratio"] - 1.0) > 1e-3
    assert result["loss"] == pytest.approx(float(torch.cat(losses).sum() / len(every)), abs=1e-5)
    third = phase.batch(2)  # batch 1 of rollouts: new samples with the current weights
    assert third is not first and phase.engine is not None and phase.engine.weight_version == 2


def test_num_iterations_one_samples_as_before(root: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(root / "model")
    tokenizer = AutoTokenizer.from_pretrained(root / "model")
    one, two = _phase(root, model, tokenizer, 1), _phase(root, model, tokenizer, 2)
    for step in range(3):  # μ = 1: step s is rollout batch s, seed generation_seed(0, 0, s)
        a, b = one.batch(step), two.batch(2 * step)
        assert [e.response_ids for e in a] == [e.response_ids for e in b]
        assert one.engine is not None and one.engine.weight_version == step
        assert a is not one.batch(step + 1)
    assert generation_seed(0, 0, 1) == (1_000_003 * 0 + 7_919 + 1)


def _args(root: Path) -> list[str]:
    return [
        "train", "grpo", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:digits", "--num-generations", "4", "--batch-size", "4",
        "--max-completion-length", "5", "--max-steps", "6", "--save-every", "2", "--lr", "3e-3",
        "--num_iterations", "2", "--no-progress", "--no-report",
    ]  # fmt: skip


def test_num_iterations_stopped_inside_a_batch_resumes_exactly(
    root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    args = _args(root)
    assert main([*args, "--out", str(root / "whole")]) == 0
    # call 4 = the second step on batch 1 of rollouts
    crash_in_call(monkeypatch, 4, lambda: main([*args, "--out", str(root / "stopped")]))
    assert sorted(p.name for p in (root / "stopped" / "checkpoints").iterdir()) == ["step-2"]
    assert main([*args, "--out", str(root / "stopped"), "--resume"]) == 0
    expected = load_file(str(root / "whole" / "final" / "model.safetensors"))
    resumed = load_file(str(root / "stopped" / "final" / "model.safetensors"))
    for k in expected:
        assert torch.equal(expected[k], resumed[k]), k
    rows = [json.loads(line) for line in (root / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward"] for r in rows[0::2]] == [r["reward"] for r in rows[1::2]]  # μ steps, one batch
    assert [r["rollout_s"] == 0.0 for r in rows] == [False, True] * 3
    assert rows[0]["ratio"] == pytest.approx(1.0, abs=1e-5) and abs(rows[1]["ratio"] - 1.0) > 1e-6


def test_train_help_lists_every_online_and_distillation_knob(capsys: pytest.CaptureFixture[str]) -> None:
    """Builder options (--cut-rejected, --margin, --keep, --min-reward), policy-term and estimator
    hyper-parameters and the distillation terms' options are flags of `preftune train --help` with who
    uses them — they were accepted but not listed."""
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    for flag, user in [
        ("--cut-rejected", "used by online_dpo, dno, xpo"),
        ("--margin V", "used by dno"),
        ("--min-reward V", "used by raft"),
        ("--eps-high V", "used by policy term ppo_clip"),
        ("--scale V", "used by estimator grpo"),
        ("--on V", "used by adpa, aligndistil, dckd, nll"),
    ]:
        assert flag in text, flag
        assert user in text[text.index(flag) :][:400], (flag, user)


def test_builder_and_policy_flags_reach_the_run() -> None:
    base = ["dno", "--model", "m", "--prompts", "p.jsonl", "--reward", "arithmetic", "--out", "o"]
    config = _cli(*base, "--cut-rejected", "--margin", "0.5", "--pairing", "all")
    assert config.hparams == {"cut_rejected": "true", "margin": "0.5", "pairing": "all"}
    from preftune.rl.builders import builder_options

    assert builder_options("dno", config.hparams) == {"margin": 0.5, "cut_rejected": True, "pairing": "all"}
    grpo = _cli("grpo", *base[1:], "--eps-high", "0.28")
    assert dict(validate(grpo)[0][2])["eps_high"] == 0.28


# (method, sampler, refused with one sample per prompt): a group baseline or a pair of samples needs
# two; a baseline of its own (remax's greedy response, ppo's value, reinforce_pp's batch), a teacher
# (dno) or a filter (raft) learns from one; samplers that set each prompt's count are not checked.
ONE_SAMPLE = [
    ("grpo", None, True), ("dr_grpo", None, True), ("rloo", None, True), ("grpo", "dapo_filter", True),
    ("grpo", "vade", True), ("online_dpo", None, True), ("xpo", None, True), ("copg", None, True),
    ("remax", None, False), ("ppo", None, False), ("reinforce_pp", None, False), ("dno", None, False),
    ("raft", None, False), ("grpo", "gvm", False), ("reinforce_ada", None, False),
]  # fmt: skip


@pytest.mark.parametrize(("method", "sampler", "refused"), ONE_SAMPLE)
def test_one_sample_per_prompt_is_refused_where_it_teaches_nothing(
    method: str, sampler: str | None, refused: bool
) -> None:
    values = {"model": "m", "prompts": "p.jsonl", "reward": "arithmetic", "out": "o", "num_generations": 1}
    config = config_from_dict({"method": method, "sampler": sampler, **values})
    if not refused:
        validate(config)
        validate(config_from_dict({**config_to_dict(config), "num_generations": 2}))
        return
    with pytest.raises(ConfigError) as err:
        validate(config)
    assert f"method '{method}' with num_generations = 1" in str(err.value)
    assert "--num-generations 2 or more" in str(err.value)
    validate(config_from_dict({**config_to_dict(config), "num_generations": 2}))  # two are enough


def test_a_batch_larger_than_the_prompt_file_is_refused(
    root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It used to log `batch 64` and sample the file's 12 prompts each step, without a word."""
    args = ["train", "grpo", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
            "--reward", "arithmetic", "--out", str(root / "big-batch"), "--max-steps", "1", "--batch-size", "13"]  # fmt: skip
    assert main(args) == 2
    said = capsys.readouterr().err
    assert (
        "--batch-size 13 prompts per step is more than the 12 prompts of" in said
        and "--batch-size 12" in said
    )


def test_a_prompt_the_verifier_cannot_read_is_named_before_the_model_loads(
    root: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """It was found at the first step's scoring, with no file or row, the whole prompt echoed."""
    bad = tmp_path / "mixed.jsonl"
    bad.write_text('{"prompt": "12+3=\\n"}\n{"prompt": "what is two plus two? ' + "x" * 200 + '\\n"}\n')
    args = ["train", "grpo", "--model", str(root / "model"), "--prompts", str(bad), "--reward", "arithmetic",
            "--out", str(tmp_path / "run"), "--max-steps", "1", "--batch-size", "2"]  # fmt: skip
    assert main(args) == 2
    said = capsys.readouterr().err
    assert f"{bad}:2: field 'prompt': not an arithmetic prompt: 'what is two plus two? xxx" in said
    assert "x" * 100 not in said  # the prompt is cut
