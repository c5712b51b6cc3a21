"""`preftune sweep` and `preftune eval` for real: two methods × two steps on a tiny model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from preftune.cli import main
from test_train_fixtures import pair_rows, tiny_model, write_jsonl


@pytest.fixture(scope="module")
def sweep(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("sweep")
    env = {
        "model": tiny_model(root / "model"),
        "data": write_jsonl(root / "pairs.jsonl", pair_rows(16)),
        "eval": write_jsonl(root / "eval.jsonl", pair_rows(6, seed=9)),
        "out": root / "sweep",
    }
    argv = [
        "sweep",
        "--methods",
        "dpo,ipo",
        "--model",
        str(env["model"]),
        "--data",
        str(env["data"]),
        "--eval-data",
        str(env["eval"]),
        "--out",
        str(env["out"]),
        "--max-steps",
        "2",
        "--batch-size",
        "4",
        "--lr",
        "3e-3",
        "--no-progress",
        "--kl-prompts",
        "4",
        "--kl-samples",
        "2",
        "--kl-max-new-tokens",
        "6",
    ]
    assert main(argv) == 0
    return env


def test_sweep_trains_both_methods_and_reuses_one_reference_pass(sweep: dict[str, Path]) -> None:
    out = sweep["out"]
    data = json.loads((out / "sweep.json").read_text())
    assert data["methods"] == ["dpo", "ipo"]
    assert data["reference_cache"] == {
        "dir": str(out / "cache"),
        "computed_by": ["dpo"],
        "reused_by": ["ipo"],
    }
    assert len(list((out / "cache" / "reference").iterdir())) == 1  # one reference table for both runs
    for res in data["results"]:
        assert res["status"] == "ok" and res["steps"] == 2, res
        summary = json.loads((out / res["method"] / "summary.json").read_text())
        # the sweep's numbers are the runs' own: final eval loss as written by the trainer
        assert res["metrics"]["eval/loss"] == pytest.approx(summary["eval"]["loss"])
        assert res["kl"]["samples"] > 0 and 0 < res["kl"]["mean_length"] <= 6
        assert (out / res["method"] / "report.html").is_file()
    # at π_θ = π_ref the first IPO loss is 1/(4β²) = 25 (β = 0.1), so its curve starts there
    ipo = [json.loads(line) for line in (out / "ipo" / "metrics.jsonl").read_text().splitlines()]
    assert ipo[0]["loss"] == pytest.approx(25.0, rel=1e-4)
    page = (out / "sweep.html").read_text()
    assert '<figure id="plot-kl"><img' in page and '<figure id="plot-curves"><img' in page
    assert "<td>ipo</td><td>ok</td><td>2</td>" in page


def test_eval_command_reproduces_the_trainers_final_evaluation(
    sweep: dict[str, Path], capsys, monkeypatch
) -> None:
    import preftune.train.runfolder as runfolder

    reports: list[Path] = []  # the run's report is rebuilt with the new eval.json (plots skipped here)
    monkeypatch.setattr(runfolder, "write_run_report", lambda out, log: reports.append(Path(out)))
    run = sweep["out"] / "dpo"
    assert (
        main(
            [
                "eval",
                str(run),
                "--data",
                str(sweep["eval"]),
                "--kl-samples",
                "2",
                "--kl-prompts",
                "4",
                "--kl-max-new-tokens",
                "6",
            ]
        )
        == 0
    )
    result = json.loads((run / "eval.json").read_text())
    summary = json.loads((run / "summary.json").read_text())
    for key in ("loss", "rewards/accuracy", "rewards/margin", "logps/chosen", "policy_rank_accuracy"):
        assert result["metrics"][key] == pytest.approx(summary["eval"][key], rel=1e-5, abs=1e-6), key
    sweep_kl = next(
        r["kl"]
        for r in json.loads((sweep["out"] / "sweep.json").read_text())["results"]
        if r["method"] == "dpo"
    )
    assert result["kl"] == pytest.approx(sweep_kl)  # same prompts, same seed → the same samples
    assert "policy_rank_accuracy" in capsys.readouterr().out
    assert reports == [run]


def test_eval_prints_no_loading_bars_and_no_future_warnings(sweep: dict[str, Path], capsys) -> None:
    import warnings

    from transformers.utils import logging as hf_logging

    hf_logging.enable_progress_bar()  # as a fresh process has it (training in this one turned it off)
    argv = ["eval", str(sweep["out"] / "ipo"), "--data", str(sweep["eval"]), "--kl-samples", "1"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main([*argv, "--kl-prompts", "2", "--kl-max-new-tokens", "3"]) == 0
        warnings.warn("a library's deprecation notice", FutureWarning, stacklevel=1)
    err = capsys.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err
    assert not [w for w in caught if issubclass(w.category, FutureWarning)]


def test_eval_and_report_refuse_a_folder_that_is_not_a_run(tmp_path: Path, capsys) -> None:
    assert main(["eval", str(tmp_path), "--data", "x.jsonl"]) == 2
    assert "not a finished training run" in capsys.readouterr().err
    assert main(["report", str(tmp_path)]) == 2
    assert "no metrics.jsonl here" in capsys.readouterr().err
