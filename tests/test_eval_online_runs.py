"""`preftune eval RUN --data PAIRS` on an online or distillation run: it failed with "method
'online_dpo' needs 'prompts'" (or "grpo is reference-free") because it rebuilt the run's training
config. The preference metrics now use the pairwise loss the run trained (online DPO, DNO) or `dpo`,
with the run's hyper-parameters that loss declares, against the run's starting model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from online_fixtures import online_root
from preftune.cli import main
from preftune.eval.commands import preference_objective
from preftune.train.evaluation import evaluate
from test_train_fixtures import pair_rows, write_jsonl


@pytest.mark.parametrize(
    ("method", "objective", "hparams", "expected"),
    [
        ("dpo", None, {"beta": 0.2}, ("dpo", {"beta": 0.2})),  # offline: as trained
        (
            "kto",
            None,
            {"beta": 0.2, "desirable_weight": 2.0},
            ("kto", {"beta": 0.2, "desirable_weight": 2.0}),
        ),
        ("online_dpo", None, {"beta": 1.0, "cut_rejected": True}, ("dpo", {"beta": 1.0})),
        ("online_dpo", "ipo", {"beta": 0.5}, ("ipo", {"beta": 0.5})),
        ("dno", None, {"beta": 1.0, "margin": 0.5, "dpo.beta": 2.0}, ("dpo", {"beta": 1.0, "dpo.beta": 2.0})),
        ("xpo", None, {"alpha": 1e-5, "beta": 1.0}, ("dpo", {"beta": 1.0})),  # 3 branches: DPO's metrics
        ("grpo", "ppo_clip:1", {"ppo_clip.eps_high": 0.28, "scale": "batch"}, ("dpo", {})),
        ("raft", None, {"keep": 0, "min_reward": 1.0}, ("dpo", {})),
        ("adpa:1,nll:1", None, {"on": "rejected"}, ("dpo", {})),
    ],
)
def test_the_objective_eval_scores_a_run_with(method, objective, hparams, expected) -> None:
    assert preference_objective(method, objective, hparams) == expected


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = online_root(tmp_path_factory, "eval_online")
    write_jsonl(root / "eval.jsonl", pair_rows(6, seed=9))
    for method, extra in [("online_dpo", ["--beta", "0.5", "--cut-rejected"]), ("grpo", [])]:
        argv = [
            "train", method, "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
            "--reward", f"{root / 'rewards.py'}:digits", "--num-generations", "4", "--batch-size", "4",
            "--max-completion-length", "5", "--max-steps", "2", "--lr", "3e-3", "--no-progress",
            "--no-report", "--out", str(root / method), *extra,
        ]  # fmt: skip
        assert main(argv) == 0
    return root


@pytest.mark.train_report  # eval rebuilds the run's report
@pytest.mark.parametrize(("method", "beta"), [("online_dpo", 0.5), ("grpo", 0.1)])
def test_eval_of_an_online_run_equals_dpo_metrics_against_its_start(runs: Path, method, beta, capsys) -> None:
    run = runs / method
    assert main(["eval", str(run), "--data", str(runs / "eval.jsonl"), "--kl-samples", "0"]) == 0
    out = capsys.readouterr().out
    assert ("preference metrics with dpo" in out) == (method == "grpo")
    result = json.loads((run / "eval.json").read_text())
    assert result["metrics_objective"] == "dpo" and result["reference"] == str(runs / "model")
    direct = evaluate(
        str(run / "final"), str(runs / "eval.jsonl"), method="dpo", ref_model=str(runs / "model"),
        hparams={"beta": beta}, cache_dir=str(runs / "cache"),
    )  # fmt: skip
    for key in ("loss", "rewards/margin", "rewards/accuracy", "logps/chosen"):
        assert result["metrics"][key] == pytest.approx(direct[key], rel=1e-6, abs=1e-7), key
    assert result["metrics"]["rewards/margin"] != 0.0  # the policy moved from its start
    assert "scored with the dpo loss" in (run / "report.html").read_text()  # the report says so
