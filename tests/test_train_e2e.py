"""End to end through `preftune train` on a tiny model: every registered loss, learnability, the
reference cache, reference strategies (adapter, TR-DPO sync, rounds), non-finite handling, OUT/final."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from preftune import losses
from preftune.cli import main
from preftune.errors import TrainingError
from preftune.method_checks import DIFFUSION_LOSSES
from test_train_fixtures import pair_rows, ranked_rows, tiny_model, unpaired_rows, write_jsonl


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("e2e")
    labelled = [{**r, "label": 0.8} for r in pair_rows(16)]
    return {
        "root": root,
        "model": tiny_model(root / "model"),
        "pairwise": write_jsonl(root / "pairs.jsonl", labelled),
        "unpaired": write_jsonl(root / "unpaired.jsonl", unpaired_rows(16)),
        "listwise": write_jsonl(root / "ranked.jsonl", ranked_rows(8)),
        "eval": write_jsonl(root / "eval.jsonl", pair_rows(8, seed=9)),
        "cache": root / "cache",
    }


def run(
    env: dict[str, Path], method: str, out: str, *extra: str, data: str = "pairwise"
) -> list[dict[str, Any]]:
    argv = [
        "train",
        method,
        "--model",
        str(env["model"]),
        "--data",
        str(env[data]),
        "--out",
        str(env["root"] / out),
        "--cache-dir",
        str(env["cache"]),
        "--no-progress",
        "--lr",
        "1e-3",
        "--batch-size",
        "4",
        "--max-steps",
        "2",
        *extra,
    ]
    assert main(argv) == 0
    lines = (env["root"] / out / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


# Losses at π_θ = π_ref (first step, the reference is the initial policy), docs/algorithms.md §6.
AT_REFERENCE = {
    "dpo": math.log(2),
    "cdpo": math.log(2),
    "rdpo": math.log(2),
    "ipo": 1 / (4 * 0.1**2),
    "hinge": 1.0,
    "bco": 2 * math.log(2),
    "fdpo": math.log(2),
    "ld_dpo": math.log(2),
    "exo_pair": -math.log(2) - 0.5 * math.log(1e-3 * (1 - 1e-3)),
    "nca_pair": 2 * math.log(2),
    "sppo_hard": 1 / (2 * 0.1**2),
    "apo_zero": 1.0,
    "apo_down": 1.0,
    "discopop": 0.5 * math.log(2) + 0.5,
    "aot": math.log(2),
    "aot_unpaired": math.log(2),
}


@pytest.mark.parametrize("name", sorted(set(losses.REGISTRY) - set(DIFFUSION_LOSSES)))
def test_every_registered_loss_trains_from_the_cli(env: dict[str, Path], name: str) -> None:
    """Every language-model loss; the diffusion-only ones refuse a language model
    (tests/test_method_model_kind.py) and train on a pipeline (tests/test_diffusion_*.py)."""
    spec = losses.get(name)
    kind = {"any": "pairwise"}.get(spec.kind, spec.kind)
    records = run(env, name, f"reg-{name}", "--max-steps", "1", data=kind)
    train = [r for r in records if r["split"] == "train"]
    assert [r["step"] for r in train] == [1]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in train)
    if name in AT_REFERENCE:
        assert train[0]["loss"] == pytest.approx(AT_REFERENCE[name], rel=1e-4)
    if spec.needs_reference and "rewards/margin" in train[0]:
        assert abs(train[0]["rewards/margin"]) < 1e-4  # ρ = 0 before the first update
    from safetensors.torch import load_file

    final = load_file(str(env["root"] / f"reg-{name}" / "final" / "model.safetensors"))
    start = load_file(str(env["model"] / "model.safetensors"))
    assert any(not torch.equal(final[k], start[k]) for k in start)  # the optimizer moved the policy


def test_dpo_learns_and_evaluates(env: dict[str, Path]) -> None:
    records = run(
        env,
        "dpo",
        "learn",
        "--max-steps",
        "10",
        "--batch-size",
        "8",
        "--lr",
        "3e-3",
        "--beta",
        "0.5",
        "--eval-data",
        str(env["eval"]),
        "--eval-every",
        "5",
    )
    train = [r for r in records if r["split"] == "train"]
    evals = [r for r in records if r["split"] == "eval"]
    assert train[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    assert train[-1]["loss"] < 0.3 and train[-1]["rewards/accuracy"] == 1.0
    assert [r["step"] for r in evals] == [5, 10] and evals[-1]["loss"] < evals[0]["loss"] < math.log(2)
    for key in (
        "rewards/chosen",
        "rewards/rejected",
        "logps/chosen",
        "logps/rejected",
        "logps/chosen_per_token",
        "logps/rejected_per_token",
        "policy_rank_accuracy",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "examples_per_s",
    ):
        assert key in train[-1]
    summary = json.loads((env["root"] / "learn" / "summary.json").read_text())
    assert summary["steps"] == 10 and summary["eval"]["loss"] == evals[-1]["loss"]
    import yaml

    recorded = yaml.safe_load((env["root"] / "learn" / "config.yaml").read_text())
    # the resolved values the run used (not the CLI string), defaults included
    assert recorded["hparams"] == {"beta": 0.5, "wpo_weighting": False}
    from transformers import AutoModelForCausalLM, AutoTokenizer

    final = env["root"] / "learn" / "final"
    assert AutoModelForCausalLM.from_pretrained(final).config.num_hidden_layers == 2
    assert AutoTokenizer.from_pretrained(final)("1+2=")["input_ids"]
    # the public evaluate() (used by `preftune eval`) reproduces the run's final evaluation
    from preftune.train.api import evaluate

    again = evaluate(
        final,
        str(env["eval"]),
        method="dpo",
        ref_model=str(env["model"]),
        hparams={"beta": 0.5},
        cache_dir=str(env["cache"]),
    )
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "policy_rank_accuracy"):
        assert again[key] == pytest.approx(evals[-1][key], rel=1e-4, abs=1e-6), key


def test_second_run_skips_the_reference_pass(
    env: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    cache = env["root"] / "fresh-cache"
    run(env, "dpo", "cache-a", "--cache-dir", str(cache))
    assert "computing log-probs" in capsys.readouterr().out
    run(env, "ipo", "cache-b", "--cache-dir", str(cache))  # another method, same model and data
    assert "reference pass skipped" in capsys.readouterr().out


def test_lora_adapter_reference(env: dict[str, Path]) -> None:
    records = run(env, "dpo", "lora", "--lora", "--reference", "adapter", "--lr", "1e-2")
    assert records[0]["loss"] == pytest.approx(math.log(2), rel=1e-4)  # LoRA B = 0: policy = base
    assert records[1]["rewards/margin"] != 0.0
    final = env["root"] / "lora" / "final"
    assert (final / "adapter_model.safetensors").is_file() and (final / "adapter_config.json").is_file()
    from peft import AutoPeftModelForCausalLM

    assert AutoPeftModelForCausalLM.from_pretrained(final) is not None


def test_tr_dpo_hard_sync_resets_the_margin(env: dict[str, Path]) -> None:
    # α = 1, every step: after step 1 the reference equals the policy, so step 2 starts at ρ = 0.
    records = run(env, "dpo", "trdpo", "--ref-sync-every", "1", "--ref-sync-alpha", "1.0")
    assert records[1]["loss"] == pytest.approx(math.log(2), rel=1e-4)
    no_sync = run(env, "dpo", "no-sync", "--reference", "model")
    assert no_sync[1]["loss"] < math.log(2) - 1e-4


def test_rounds_restart_the_reference(env: dict[str, Path]) -> None:
    # one step per round: without the reset step 2 would start below log 2 (see the no-sync run above)
    records = run(env, "dpo", "rounds", "--rounds", "2")
    assert [r["phase"] for r in records] == [0, 1]
    assert records[1]["loss"] == pytest.approx(math.log(2), rel=1e-4)  # new round: reference = policy


def test_curry_stages_use_the_previous_stage_as_reference(env: dict[str, Path]) -> None:
    records = run(env, "dpo", "curry", "--stages", "2", "--max-steps", "4", "--lr", "3e-3", data="listwise")
    assert [r["phase"] for r in records] == [0, 0, 1, 1]
    assert records[1]["loss"] < math.log(2) - 1e-4
    assert records[2]["loss"] == pytest.approx(math.log(2), rel=1e-4)  # stage 2 starts at ρ = 0


def test_accelerated_po_rounds_extrapolate_from_the_previous_result(env: dict[str, Path]) -> None:
    """2 rounds of 1 step, α = 0.5: θ_1 = θ̂_1 + α(θ̂_1 − θ_0), θ_2 = θ̂_2 + α(θ̂_2 − θ̂_1), checked on
    the checkpoints (which hold θ_t as weights and θ̂_t as `apo_prev`)."""
    from safetensors.torch import load_file

    run(
        env,
        "dpo",
        "apo",
        "--rounds",
        "2",
        "--apo-alpha",
        "0.5",
        "--save-every",
        "1",
        "--keep-last",
        "2",
        "--lr",
        "1e-2",
    )
    ck = env["root"] / "apo" / "checkpoints"
    theta0 = load_file(str(env["model"] / "model.safetensors"))
    w1, hat1 = (
        load_file(str(ck / "step-1" / "model.safetensors")),
        load_file(str(ck / "step-1" / "apo_prev.safetensors")),
    )
    w2, hat2 = (
        load_file(str(ck / "step-2" / "model.safetensors")),
        load_file(str(ck / "step-2" / "apo_prev.safetensors")),
    )
    assert any(not torch.equal(hat1[k], theta0[k]) for k in hat1)
    for k in hat1:
        torch.testing.assert_close(w1[k], hat1[k] + 0.5 * (hat1[k] - theta0[k]))
        torch.testing.assert_close(w2[k], hat2[k] + 0.5 * (hat2[k] - hat1[k]))


def test_accelerated_po_extrapolates() -> None:
    from preftune.train.setup import extrapolate

    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.tensor([[1.0, 3.0]]))
    extrapolate(model, {"weight": torch.tensor([[0.0, 1.0]])}, alpha=0.5)
    assert model.weight.tolist() == [[1.5, 4.0]]  # θ + 0.5 (θ − θ_prev)


def _nan_on_step(monkeypatch: pytest.MonkeyPatch, step: int) -> None:
    import preftune.models.logprobs as lp

    real, calls = lp.example_stats, {"n": 0}

    def poisoned(model: Any, examples: Any, **kw: Any) -> Any:
        st = real(model, examples, **kw)
        if torch.is_grad_enabled():
            calls["n"] += 1
            if calls["n"] == step:
                st.logps = st.logps * float("nan")
        return st

    monkeypatch.setattr(lp, "example_stats", poisoned)


def test_nonfinite_loss_stops_and_names_the_checkpoint(
    env: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    from preftune.config import load_config
    from preftune.train.api import train

    _nan_on_step(monkeypatch, 3)
    config = load_config(
        None,
        {
            "method": "dpo",
            "model": str(env["model"]),
            "data": str(env["pairwise"]),
            "out": str(env["root"] / "nan"),
            "cache_dir": str(env["cache"]),
            "progress": False,
            "batch_size": 4,
            "max_steps": 4,
            "save_every": 1,
            "keep_last": 5,
            "lr": 1e-3,
        },
    )
    with pytest.raises(TrainingError, match=r"non-finite loss at step 3.*step-2"):
        train(config)
    names = sorted(p.name for p in (env["root"] / "nan" / "checkpoints").iterdir())
    assert names == ["step-1", "step-2"]  # no poisoned step-3


def test_nonfinite_step_is_skipped_when_asked(env: dict[str, Path], monkeypatch: pytest.MonkeyPatch) -> None:
    _nan_on_step(monkeypatch, 2)
    records = run(
        env,
        "bco",
        "nan-skip",
        "--max-steps",
        "3",
        "--on-nonfinite",
        "skip",
        "--save-every",
        "1",
        "--keep-last",
        "3",
    )
    assert [r["skipped"] for r in records] == [0.0, 1.0, 0.0]
    assert math.isfinite(records[2]["loss"])
    from safetensors.torch import load_file

    ckpts = env["root"] / "nan-skip" / "checkpoints"
    deltas = [load_file(str(ckpts / f"step-{s}" / "loss_state.safetensors")) for s in (1, 2, 3)]
    assert deltas[0] and deltas[1].keys() == deltas[0].keys()  # BCO keeps its running δ as loss state
    assert all(torch.equal(deltas[1][k], deltas[0][k]) for k in deltas[0])
    assert all(torch.isfinite(v).all() for d in deltas for v in d.values())  # BCO's δ never saw the NaN
    w1 = load_file(str(ckpts / "step-1" / "model.safetensors"))
    w2 = load_file(str(ckpts / "step-2" / "model.safetensors"))
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step did not move the weights


def test_reference_fingerprint_covers_weights_and_architecture(env: dict[str, Path]) -> None:
    from preftune.models.load import LoraSettings, load_causal_lm
    from preftune.models.reference import model_fingerprint

    plain = load_causal_lm(env["model"])
    lora = load_causal_lm(env["model"], lora=LoraSettings(r=4))
    assert model_fingerprint(plain) == model_fingerprint(lora, adapters=False)  # base of the LoRA policy
    assert model_fingerprint(plain) != model_fingerprint(lora)  # adapters on: other weights
    with torch.no_grad():
        next(plain.parameters())[0, 0] += 1e-3
    changed = model_fingerprint(plain)
    assert changed != model_fingerprint(lora, adapters=False)
    plain.config.rms_norm_eps = 1e-3  # same weights, other architecture settings
    assert model_fingerprint(plain) != changed
