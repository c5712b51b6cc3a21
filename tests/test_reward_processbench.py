"""ProcessBench metrics by hand, the task-built set, and preftune train prm / eval on a PRM run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.errors import ConfigError, DataError
from preftune.reward import prm_training
from preftune.reward.processbench import (
    choose_threshold,
    dev_test_split,
    evaluate_values,
    first_below,
    processbench_from_task,
    processbench_metrics,
)
from preftune.tasks.arithmetic import verify
from test_train_fixtures import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_metrics_by_hand():
    # erroneous items: labels 0, 2, 1 predicted 0, 1, 1 → 2/3; correct items: 2 of 4 predicted −1
    m = processbench_metrics([0, 1, 1, -1, 3, -1, 0], [0, 2, 1, -1, -1, -1, -1])
    assert m["acc_err"] == pytest.approx(2 / 3) and m["acc_corr"] == pytest.approx(0.5)
    assert m["f1"] == pytest.approx(2 * (2 / 3) * 0.5 / (2 / 3 + 0.5))  # 4/7
    assert (m["erroneous"], m["correct"]) == (3.0, 4.0)
    assert processbench_metrics([-1, -1], [0, 1])["f1"] == 0.0


def test_threshold_on_dev_and_metrics_on_test():
    assert first_below([0.9, 0.4, 0.1], 0.5) == 1 and first_below([0.9, 0.8], 0.5) == -1
    values = [[0.9, 0.3], [0.8, 0.7], [0.2, 0.9]]
    labels = [1, -1, 0]
    # every τ in (0.3, 0.7] is perfect; the midpoints are 0.25, 0.5, 0.75, 0.85: 0.5 is chosen
    assert choose_threshold(values, labels) == pytest.approx(0.5)
    assert dev_test_split(7) == ([0, 3, 6], [1, 2, 4, 5])
    six = [[0.9, 0.4], [0.9, 0.6], [0.9, 0.4], [0.9, 0.6], [0.9, 0.6], [0.3]]
    labels6 = [1, 1, 1, -1, -1, 0]
    # dev items 0, 3: candidates −0.6, 0.5, 0.75, 1.9; only τ = 0.5 gets both right
    out = evaluate_values(six, labels6)
    assert out["threshold"] == pytest.approx(0.5)
    # test items 1, 2, 4, 5 → predicted −1, 1, −1, 0 against 1, 1, −1, 0: acc_err 2/3, acc_corr 1
    assert out["acc_err"] == pytest.approx(2 / 3) and out["acc_corr"] == 1.0
    fixed = evaluate_values(six, labels6, threshold=0.7)  # all items, τ given: 0.6 < τ flags items 3, 4
    assert (fixed["erroneous"], fixed["correct"], fixed["acc_corr"]) == (4.0, 2.0, 0.0)


def test_task_built_set_has_exact_labels_and_the_official_fields():
    items = processbench_from_task(40, seed=3)
    assert set(items[0]) == {"id", "generator", "problem", "steps", "final_answer_correct", "label"}
    wrong = [it for it in items if it["label"] >= 0]
    assert 10 <= len(wrong) <= 30
    for it in items:
        v = verify(it["problem"], "\n".join(it["steps"]))
        assert it["label"] == (-1 if v.first_error is None else v.first_error)
    assert processbench_from_task(40, seed=3) == items


ARGS = ["--batch-size", "4", "--max-steps", "4", "--lr", "1e-3", "--save-every", "2", "--seed", "3"]


@pytest.fixture(scope="module")
def prm_run(tmp_path_factory):
    from preftune.models.tiny import save_tiny_model
    from preftune.tasks.arithmetic import ArithmeticTask

    root = tmp_path_factory.mktemp("prmrun")
    save_tiny_model("llama", root / "lm", vocab_size=32, tokenizer=ArithmeticTask().build_tokenizer())
    data = write_jsonl(root / "pb.jsonl", processbench_from_task(24, seed=1))
    base = ["train", "prm", "--model", str(root / "lm"), "--data", str(data), *ARGS]
    assert main([*base, "--out", str(root / "whole")]) == 0
    return root, base


def test_train_prm_writes_a_prm_folder_and_eval_reports_processbench(prm_run, capsys):
    root, _ = prm_run
    final = root / "whole" / "final"
    assert json.loads((final / "prm.json").read_text()) == {
        "loss": "prm_bce",
        "separator": "\n",
        "aggregation": "min",
    }
    records = [json.loads(x) for x in (root / "whole" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and all(0 < r["loss"] < 2 for r in records)
    assert main(["eval", str(root / "whole"), "--data", str(root / "pb.jsonl")]) == 0
    assert "eval.json" in capsys.readouterr().out
    metrics = json.loads((root / "whole" / "eval.json").read_text())["metrics"]
    assert set(metrics) == {"items", "acc_err", "acc_corr", "f1", "erroneous", "correct", "threshold"}
    assert metrics["items"] == 24.0 and metrics["erroneous"] + metrics["correct"] == 16.0


def test_interrupted_prm_run_resumes_bit_identically(prm_run, monkeypatch):
    root, base = prm_run
    out = root / "broken"
    real, calls = prm_training._step, {"n": 0}

    def dying(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(prm_training, "_step", dying)
    assert main([*base, "--out", str(out)]) != 0
    monkeypatch.setattr(prm_training, "_step", real)
    assert main([*base, "--out", str(out), "--resume"]) == 0
    a = load_file(str(root / "whole" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_bad_settings_and_labels_are_refused(prm_run, tmp_path: Path):
    root, base = prm_run
    from preftune.config import load_config

    cfg = {
        "method": "prm",
        "model": str(root / "lm"),
        "data": str(root / "pb.jsonl"),
        "out": str(tmp_path / "x"),
    }
    with pytest.raises(ConfigError, match="unknown PRM loss 'bce'"):
        prm_training.train_prm(load_config(None, {**cfg, "hparams": {"loss": "bce"}}))
    with pytest.raises(ConfigError, match="takes --loss.*not beta"):
        prm_training.train_prm(load_config(None, {**cfg, "hparams": {"beta": 0.1}}))
    soft = write_jsonl(tmp_path / "pav.jsonl", [{"prompt": "1+1=\n", "steps": ["a"], "labels": [-0.5]}])
    with pytest.raises(
        DataError, match=r"pav.jsonl:1: field 'labels': holds -0.5; prm_bce trains on labels in \[0, 1\]"
    ):
        prm_training.prm_items(str(soft), None, "prm_bce")
    assert prm_training.prm_items(str(soft), None, "pav_mse")[0].labels == (-0.5,)


def test_eval_data_reports_processbench_during_training(prm_run, tmp_path: Path):
    """--eval-data: ProcessBench metrics in metrics.jsonl (split eval) every --eval-every steps; the
    last equal `preftune eval`'s on the final folder (the same items, τ on the same dev split)."""
    from preftune.reward.processbench import evaluate_prm_folder

    root, base = prm_run
    out = tmp_path / "evald"
    data = str(root / "pb.jsonl")
    assert main([*base, "--out", str(out), "--eval-data", data, "--eval-every", "2"]) == 0
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r["split"] == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    final = evaluate_prm_folder(out / "final", data)
    for key in ("acc_err", "acc_corr", "f1", "threshold", "erroneous", "correct"):
        assert evals[-1][key] == pytest.approx(final[key], abs=1e-6), key
    assert json.loads((out / "summary.json").read_text())["eval"]["f1"] == pytest.approx(
        final["f1"], abs=1e-6
    )


def test_resume_refuses_step_data_rewritten_under_its_path(prm_run, tmp_path, capsys):
    """The step-labelled file rewritten between a stop and `--resume` (same path, other solutions):
    refused in one line naming the file and the checkpoint (it was trained on silently)."""
    import shutil

    from test_train_fixtures import assert_resume_refuses_data

    root, base = prm_run
    data = write_jsonl(tmp_path / "pb.jsonl", processbench_from_task(24, seed=1))
    out = tmp_path / "run"
    args = [*base, "--out", str(out), "--no-report"]
    args[args.index("--data") + 1] = str(data)
    assert main(args) == 0
    assert json.loads((out / "checkpoints" / "step-2" / "trainer_state.json").read_text())["data_digest"]
    shutil.rmtree(out / "final")
    shutil.rmtree(out / "checkpoints" / "step-4")
    write_jsonl(data, processbench_from_task(24, seed=2))
    assert_resume_refuses_data(main, capsys, args, out, "data", data, out / "checkpoints" / "step-2")
    assert not (out / "final").exists() and not (out / "checkpoints" / "step-4").exists()
    write_jsonl(data, processbench_from_task(24, seed=1))
    assert main([*args, "--resume"]) == 0
    a = load_file(str(root / "whole" / "final" / "model.safetensors"))
    b = load_file(str(out / "final" / "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)
