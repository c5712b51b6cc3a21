"""Reward-model data: the per-row `margin` column of bt_margin / bt_scaled, checked as PATH:ROW: field."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from preftune.cli import main
from preftune.config import load_config
from preftune.data.validate import check_data
from preftune.errors import DataError
from preftune.reward.scoring import load_scorer
from preftune.reward.training import pair_margins, pair_scores, rm_examples, train_rm
from preftune.train.api import seed_everything
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def _margin_rows(margins: list[object]) -> list[dict]:
    return [{**r, "margin": m} for r, m in zip(pair_rows(len(margins), seed=4), margins)]


def _config(model: Path, data: Path, out: Path, loss: str):
    return load_config(None, {"method": "rm", "model": str(model), "data": str(data), "out": str(out),
                              "hparams": {"loss": loss}, "max_steps": 1, "batch_size": 4, "seed": 5})  # fmt: skip


def test_margin_column_is_the_m_of_bt_margin(tmp_path):
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "m.jsonl", _margin_rows([0.5, 2.0, -1.0, 3.0]))
    config = _config(model, data, tmp_path / "run", "bt_margin")
    from preftune.data.formatting import load_tokenizer

    examples = rm_examples(str(data), config, load_tokenizer(str(model)), None)
    assert [e.margin for e in examples] == [0.5, 2.0, -1.0, 3.0]
    assert pair_margins(examples).tolist() == [0.5, 2.0, -1.0, 3.0]
    # the step-1 loss is the mean of −log σ(s_c − s_r − m) under the initial weights (same seed)
    seed_everything(5)
    rm = load_scorer(str(model))
    with torch.no_grad():
        s_c, s_r = pair_scores(rm, examples)
    m = torch.tensor([0.5, 2.0, -1.0, 3.0])
    expected = float(torch.nn.functional.softplus(-(s_c - s_r - m)).mean())
    train_rm(config)
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(expected, abs=1e-6)
    assert expected > math.log(1 + math.exp(1.0))  # the margins moved it well off plain bt's log 2


def test_bad_margin_is_reported_as_path_row_field(tmp_path):
    data = write_jsonl(tmp_path / "m.jsonl", _margin_rows([1.0, "big", None]))
    result = check_data(str(data))
    rendered = [p.render() for p in result.problems]
    assert rendered == [
        f"{data}:2: field 'margin': is a str, expected a finite number — write how much chosen is better "
        "as a number, e.g. 1, 2 or 3, or drop the field"
    ]


def test_bt_scaled_needs_a_positive_strength(tmp_path, capsys):
    model = tiny_model(tmp_path / "sft")
    data = write_jsonl(tmp_path / "m.jsonl", _margin_rows([1.0, 2.0, 0.0, 1.0]))
    args = ["train", "rm", "--model", str(model), "--data", str(data), "--max-steps", "1"]
    assert main([*args, "--out", str(tmp_path / "a"), "--loss", "bt_scaled"]) != 0
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        f"{data}:3: field 'margin': bt_scaled's strength is 0; it must be > 0 — give chosen a positive "
        "margin over rejected (e.g. 1, 2, 3) or drop the row"
    )
    plain = write_jsonl(tmp_path / "plain.jsonl", pair_rows(4))
    with pytest.raises(DataError, match="no pair has a margin, so bt_margin / bt_scaled would train"):
        train_rm(_config(model, plain, tmp_path / "b", "bt:1,bt_margin:0.5"))


def test_data_check_reads_step_labels_and_ratings_as_training_does(tmp_path, capsys):
    """`data check` used to call a PRM file with mismatched labels, or ratings of "high", OK (kind
    prompts); it now detects both kinds and lists every bad row with the parser training uses."""
    good = [{"prompt": "1+2=", "steps": ["1 2", "3."], "first_error": -1},
            {"prompt": "1+2=", "steps": ["1 2", "4."], "labels": [1, 0]},
            {"problem": "1+3=", "steps": ["1 3", "5.", "4."], "label": 1}]  # ProcessBench's fields  # fmt: skip
    assert main(["data", "check", str(write_jsonl(tmp_path / "steps.jsonl", good))]) == 0
    said = capsys.readouterr().out
    assert "OK — 3 solutions of step-labelled data" in said and "7 steps (2–3 per solution)" in said
    assert "2 with a wrong step, 1 all right" in said
    bad = [good[0], {"prompt": "1+2=", "steps": ["1 2", "3."], "labels": [1]},
           {"prompt": "1+2=", "steps": [], "first_error": -1},
           {"prompt": "1+2=", "steps": ["1 2"], "first_error": 7}]  # fmt: skip
    assert main(["data", "check", str(write_jsonl(tmp_path / "bad_steps.jsonl", bad))]) == 1
    said = capsys.readouterr().out
    assert "bad_steps.jsonl:2: field 'labels': has 1 labels for 2 steps" in said
    assert "bad_steps.jsonl:3: field 'steps'" in said and "bad_steps.jsonl:4: field 'first_error'" in said
    assert "3 problem(s) in step-labelled data" in said
    rated = [{"prompt": "a", "response": "b", "rating": 4}, {"prompt": "a", "response": "c", "rating": 2.5}]
    assert main(["data", "check", str(write_jsonl(tmp_path / "rated.jsonl", rated))]) == 0
    assert "OK — 2 rated responses to 1 prompts" in capsys.readouterr().out
    rated += [
        {"prompt": "a", "response": "d", "rating": "high"},
        {"prompt": "a", "response": "", "rating": 1},
    ]
    assert main(["data", "check", str(write_jsonl(tmp_path / "bad_rated.jsonl", rated))]) == 1
    said = capsys.readouterr().out
    assert (
        "bad_rated.jsonl:3: field 'rating': is 'high'" in said
        and "bad_rated.jsonl:4: field 'response'" in said
    )
    assert main(["data", "check", str(tmp_path / "rated.jsonl"), "--kind", "steps"]) == 1  # forced kind
    assert "field 'steps'" in capsys.readouterr().out


def test_the_wrong_data_or_loss_for_a_reward_model_says_which_fits(tmp_path, capsys):
    """Pairs given to --loss regression listed a "field 'rating': missing" line per row; an unknown
    loss listed the pairwise losses only; prompt rows could not be told from a broken file."""
    model = tiny_model(tmp_path / "sft")
    pairs = write_jsonl(tmp_path / "p.jsonl", pair_rows(4))
    base = ["train", "rm", "--model", str(model), "--data", str(pairs), "--max-steps", "1"]
    assert main([*base, "--out", str(tmp_path / "a"), "--loss", "regression"]) == 2
    said = capsys.readouterr().err
    assert "p.jsonl:1: holds preference pairs (prompt, chosen, rejected), not ratings" in said
    assert "--loss bt" in said and said.count("\n") == 1
    assert main([*base, "--out", str(tmp_path / "b"), "--loss", "foo"]) == 2
    assert "center on pairs, regression on rating data" in capsys.readouterr().err
    prompts = write_jsonl(tmp_path / "prompts.jsonl", [{"prompt": "1+2=", "answer": 3}])
    result = check_data(str(prompts), kind=None)  # read as preference data: the prompt-file hint
    assert (
        "rows with a 'prompt' and no response are prompts: give them as --prompts" in result.problems[0].fix
    )
