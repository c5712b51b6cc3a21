"""`preftune eval` reads held-out --data as training reads its data: --columns, --kind and --on-invalid
(the flags its own error messages suggest; they were "unrecognized arguments"), and step-labelled data
given to a preference or reward-model command is named as such (it was called prompt data)."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import pytest

from preftune.cli import build_parser, main
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

KL = ["--kl-samples", "1", "--kl-prompts", "2", "--kl-max-new-tokens", "3"]
RENAMED = {"prompt": "question", "chosen": "good", "rejected": "bad"}
STEP_ROWS = [
    {"prompt": "12+9=", "steps": ["2+9+0=11 r1", "1+0+1=2 r21", "answer: 21"], "labels": [1, 1, 1]},
    {"prompt": "12+9=", "steps": ["2+9+0=12 r2", "answer: 22"], "labels": [0, 0]},
]


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval-data")
    model = tiny_model(root / "model")
    data = write_jsonl(root / "pairs.jsonl", pair_rows(8))
    out = root / "dpo"
    argv = ["train", "dpo", "--model", str(model), "--data", str(data), "--out", str(out), "--max-steps", "2",
            "--batch-size", "4", "--no-progress", "--no-report", "--cache-dir", str(root / "cache")]  # fmt: skip
    assert main(argv) == 0
    held = pair_rows(6, seed=9)
    return {
        "run": out,
        "held": write_jsonl(root / "held.jsonl", held),
        "renamed": write_jsonl(root / "renamed.jsonl", [{RENAMED[k]: v for k, v in r.items()} for r in held]),
        "bad": write_jsonl(root / "bad.jsonl", [*held, {"prompt": "1+1=", "chosen": "", "rejected": 5}]),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": r["prompt"]} for r in held]),
        "steps": write_jsonl(root / "steps.jsonl", STEP_ROWS),
    }


@pytest.fixture(autouse=True)
def no_report_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    import preftune.train.runfolder as runfolder

    monkeypatch.setattr(runfolder, "write_run_report", lambda out, log: None)


def _eval(run: dict[str, Path], data: str, *flags: str) -> tuple[int, dict]:
    rc = main(["eval", str(run["run"]), "--data", str(run[data]), *flags, *KL])
    result = json.loads((run["run"] / "eval.json").read_text()) if rc == 0 else {}
    return rc, result


def test_columns_read_renamed_columns_to_the_same_metrics(run: dict[str, Path]) -> None:
    rc, plain = _eval(run, "held")
    assert rc == 0
    mapping = ",".join(f"{field}={column}" for field, column in RENAMED.items())
    rc, renamed = _eval(run, "renamed", "--columns", mapping)
    assert rc == 0
    assert renamed["metrics"] == pytest.approx(plain["metrics"])
    assert renamed["kl"] == pytest.approx(plain["kl"])  # the KL's prompts are read with --columns too


def test_on_invalid_drop_skips_the_bad_row_and_says_so(
    run: dict[str, Path], capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert _eval(run, "bad")[0] == 2
    assert "--on-invalid drop" in capsys.readouterr().err
    rc, result = _eval(run, "bad", "--on-invalid", "drop")
    assert rc == 0 and result["metrics"]["examples"] == 6
    assert caplog.text.count("dropped 1 row") == 1  # said once, not again by the KL's pass


def _eval_flags() -> set[str]:
    parser = build_parser(["eval"])
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return set(sub.choices["eval"]._option_string_actions)


def test_every_flag_an_eval_error_suggests_is_an_eval_flag(
    run: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    errors = []
    for data, flags in [
        ("renamed", ()),
        ("bad", ()),
        ("prompts", ()),
        ("held", ("--columns", "chosen=nope")),
    ]:
        assert _eval(run, data, *flags)[0] == 2
        errors.append(capsys.readouterr().err)
    suggested = {flag for err in errors for flag in re.findall(r"(?<![\w-])--[a-z][a-z-]*", err)}
    assert {"--on-invalid", "--columns", "--kind", "--prompts", "--reward"} <= suggested, errors
    assert suggested <= _eval_flags()


def test_kind_overrides_the_runs_and_a_prm_run_refuses_the_data_flags(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _eval(run, "held", "--kind", "ranked")[0] == 2  # pairs read as ranked rows: refused
    assert "responses" in capsys.readouterr().err
    prm = tmp_path / "prm"
    (prm / "final").mkdir(parents=True)
    (prm / "config.yaml").write_text("method: prm\nmodel: m\ndata: d\nout: o\n")
    assert main(["eval", str(prm), "--data", str(run["steps"]), "--columns", "prompt=question"]) == 2
    assert "--columns: for preference data" in capsys.readouterr().err


def test_step_data_is_named_as_step_data_by_eval_and_train_rm(
    run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _eval(run, "steps")[0] == 2
    model = str(run["run"] / "final")
    argv = ["train", "rm", "--model", model, "--data", str(run["steps"]), "--out", str(tmp_path / "rm"),
            "--max-steps", "1", "--no-progress"]  # fmt: skip
    assert main(argv) == 2
    for err in capsys.readouterr().err.split("preftune: error:")[1:]:
        assert "looks like step-labelled data" in err and "preftune train prm" in err, err
        assert "give them as --prompts" not in err and "--kind" not in err, err
        assert f"preftune data check {run['steps']}" in err


def test_validate_names_step_data_and_keeps_the_prompts_hint_for_prompt_rows() -> None:
    from preftune.data.rows import SourceData
    from preftune.data.schema import validate

    trl = {"prompt": "12+9=", "completions": ["2+9+0=11 r1", "answer: 21"], "labels": [True, True]}
    for row in (STEP_ROWS[0], trl):  # TRL's stepwise `completions` too
        _, problems, kind = validate(SourceData("s.jsonl", [(1, row)]))
        assert kind is None and "step-labelled" in problems[0].message
        assert "preftune train prm" in (problems[0].fix or "")
    _, problems, _ = validate(SourceData("p.jsonl", [(1, {"prompt": "x"})]))
    assert "give them as --prompts" in (problems[0].fix or "")
