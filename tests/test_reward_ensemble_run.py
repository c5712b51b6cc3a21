"""preftune train rm --ensemble M: M seeds, a manifest, the aggregated reward and its evaluation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.config import load_config
from preftune.errors import ConfigError
from preftune.reward import load_reward
from preftune.reward.model_reward import RewardModelFn
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def ens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("ens")
    model = tiny_model(root / "sft")
    data = write_jsonl(root / "prefs.jsonl", pair_rows(8, seed=1))
    args = ["train", "rm", "--model", str(model), "--data", str(data), "--out", str(root / "ens"),
            "--ensemble", "3", "--aggregate", "min", "--max-steps", "2", "--batch-size", "4", "--lr", "1e-2"]  # fmt: skip
    assert main(args) == 0
    return root


def test_members_are_seeded_runs_and_the_manifest_names_them(ens):
    out = ens / "ens"
    assert [load_config(out / f"member-{i}" / "config.yaml").seed for i in range(3)] == [0, 1, 2]
    manifest = json.loads((out / "final" / "ensemble.json").read_text())
    assert manifest == {"members": [f"../member-{i}/final" for i in range(3)], "aggregate": "min", "lam": 0.5}
    prompts, completions = ["1+2=", "3+4=", "1+1="], ["3.", "9x.", "2."]
    members = torch.tensor([RewardModelFn(out / f"member-{i}" / "final")(prompts, completions) for i in range(3)],
                           dtype=torch.float64)  # fmt: skip
    assert len({tuple(m.tolist()) for m in members}) == 3  # three different reward models
    got = load_reward(str(out / "final"))(prompts, completions)
    torch.testing.assert_close(got, members.min(0).values, atol=1e-6, rtol=0)
    uwo = load_reward(f"ensemble:uwo:{out / 'final'}:2")(prompts, completions)  # weight 2
    expected = 2 * (members.mean(0) - 0.5 * members.var(0, unbiased=False))
    torch.testing.assert_close(uwo, expected, atol=1e-6, rtol=0)


def test_eval_scores_pairs_with_the_aggregated_reward(ens):
    out = ens / "ens"
    assert main(["eval", str(out), "--data", str(ens / "prefs.jsonl")]) == 0
    metrics = json.loads((out / "eval.json").read_text())["metrics"]
    rows = pair_rows(8, seed=1)
    reward = load_reward(str(out / "final"))
    s_c = reward([r["prompt"] for r in rows], [r["chosen"] for r in rows])
    s_r = reward([r["prompt"] for r in rows], [r["rejected"] for r in rows])
    assert metrics["accuracy"] == pytest.approx(float((s_c > s_r).double().mean()))
    assert metrics["margin"] == pytest.approx(float((s_c - s_r).mean()), abs=1e-5)


def test_bad_ensemble_settings_are_refused(ens, capsys):
    base = [
        "train",
        "rm",
        "--model",
        str(ens / "sft"),
        "--data",
        str(ens / "prefs.jsonl"),
        "--out",
        str(ens / "x"),
    ]
    assert main([*base, "--ensemble", "1"]) != 0
    assert "--ensemble 1: give the number of members, ≥ 2" in capsys.readouterr().err
    assert main([*base, "--ensemble", "2", "--aggregate", "max"]) != 0
    assert "--aggregate max: use one of mean, min, uwo, median" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="ensemble aggregator 'max'"):
        load_reward(f"ensemble:max:{ens / 'ens' / 'final'}")
