"""The run report: sections, embedded PNGs, missing metrics, accuracy chart, and `preftune report`."""

from __future__ import annotations

import argparse
import base64
import io
import json
import re
from pathlib import Path

import pytest
from matplotlib.image import imread

from preftune.errors import DataError
from preftune.eval import commands, plots
from preftune.eval.report import accuracy_groups, final_metrics, read_metrics, write_report

ALL_KEYS = (
    "loss",
    "rewards/chosen",
    "rewards/rejected",
    "rewards/margin",
    "rewards/accuracy",
    "logps/chosen_per_token",
    "logps/rejected_per_token",
    "policy_rank_accuracy",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "examples_per_s",
)


def _write_run(run: Path, *, keys=ALL_KEYS, steps=30, summary=None, extra_lines=()) -> None:
    run.mkdir(parents=True, exist_ok=True)
    lines = []
    for step in range(1, steps + 1):
        rec = {"step": step, "split": "train"}
        rec.update({k: 0.5 + 0.01 * step + 0.1 * (step % 3) for k in keys})
        rec["loss"] = 1.0 / step  # the last train loss is known exactly: 1/steps
        lines.append(json.dumps(rec))
        if step % 10 == 0:
            lines.append(
                json.dumps({"step": step, "split": "eval", "loss": 2.0 / step, "rewards/accuracy": 0.6})
            )
    lines.extend(extra_lines)
    (run / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    if summary is not None:
        (run / "summary.json").write_text(json.dumps(summary))
    (run / "config.yaml").write_text("method: dpo\nbeta: 0.1\n")


def _pngs(html: str) -> dict[str, bytes]:
    found = re.findall(
        r'<figure id="plot-([^"]+)"><img alt="[^"]*" src="data:image/png;base64,([^"]+)"', html
    )
    return {sid: base64.b64decode(b64, validate=True) for sid, b64 in found}


def test_report_has_every_section_with_valid_pngs(tmp_path):
    run = tmp_path / "run"
    _write_run(
        run,
        summary={
            "method": "dpo",
            "accuracy_before": 0.4,
            "accuracy_after": 0.65,
            "steps": 30,
            "seconds": 12.5,
        },
    )
    path = write_report(run, extra={"note": "hello <b>"})
    assert path == run / "report.html"
    html = path.read_text()
    pngs = _pngs(html)
    assert set(pngs) == {
        "accuracy",
        "loss",
        "rewards",
        "reward_accuracy",
        "logps",
        "ranking",
        "optimisation",
        "throughput",
    }
    for sid, png in pngs.items():
        assert png[:8] == b"\x89PNG\r\n\x1a\n", sid
        image = imread(io.BytesIO(png), format="png")
        assert image.shape[0] > 200 and image.shape[1] > 400, sid  # a real figure, not a blank stub
        assert image.std() > 0.01, sid  # something is drawn on it
    assert "Not plotted" not in html
    assert "40.0% → 65.0%" in html
    assert "hello &lt;b&gt;" in html  # extra details are escaped
    assert "<td>beta</td><td>0.1</td>" in html  # config table from config.yaml
    assert 'src="http' not in html and "<script" not in html  # self-contained


def test_missing_metrics_are_skipped_and_named(tmp_path):
    run = tmp_path / "run"
    _write_run(run, keys=("loss", "rewards/chosen", "lr"), summary={"method": "simpo"})
    html = write_report(run).read_text()
    pngs = _pngs(html)
    assert set(pngs) == {"loss", "rewards", "reward_accuracy", "optimisation"}  # accuracy: eval records only
    assert "accuracy" not in pngs  # no before/after in the summary, so no bar chart
    not_plotted = html.split("Not plotted")[1].split("</p>")[0]
    for key in ("policy_rank_accuracy", "tokens_per_s", "examples_per_s", "logps/chosen_per_token"):
        assert key in not_plotted
    # one note per section, naming only that section's missing keys
    assert "Not logged: rewards/rejected, rewards/margin." in html
    assert "Not logged: grad_norm." in html


def test_an_image_run_plots_images_per_second_and_does_not_miss_tokens(tmp_path):
    """A diffusion run logs images_per_s: the throughput section plots it and names no tokens_per_s
    as missing; a language run names images_per_s nowhere."""
    image = tmp_path / "image"
    keys = tuple(k for k in ALL_KEYS if k != "tokens_per_s") + ("images_per_s",)
    _write_run(image, keys=keys, summary={"method": "dpo"})
    html = write_report(image).read_text()
    assert "throughput" in _pngs(html) and "Images per second" not in html.split("Not plotted")[-1]
    assert "tokens_per_s" not in html
    text = tmp_path / "text"
    _write_run(text, summary={"method": "dpo"})
    assert "images_per_s" not in write_report(text).read_text()


def test_truncated_last_line_is_a_warning_not_an_error(tmp_path):
    run = tmp_path / "run"
    _write_run(run, keys=("loss",), steps=12, extra_lines=['{"step": 13, "split": "tr'])
    records, warnings = read_metrics(run / "metrics.jsonl")
    assert len(records) == 12 + 1  # 12 train records and the eval record at step 10
    assert len(warnings) == 1 and "metrics.jsonl:14" in warnings[0]
    assert "metrics.jsonl:14: skipped" in write_report(run).read_text()


def test_final_metrics_are_the_last_values_and_a_centred_average():
    records = [{"step": s, "split": "train", "loss": float(s)} for s in range(1, 13)]
    records.append({"step": 12, "split": "eval", "loss": 0.25})
    (row,) = final_metrics(records)
    # 12 points → half window 1: the last smoothed value is mean(11, 12) = 11.5
    assert row == ("loss", "12", "11.5", "0.25")


def test_smooth_is_a_clipped_centred_mean():
    assert plots.smooth([1.0, 2.0, 3.0, 4.0, 10.0], 1) == pytest.approx([1.5, 2.0, 3.0, 17 / 3, 7.0])
    assert plots.smooth([1.0, 5.0], 0) == [1.0, 5.0]
    assert plots.smoothing_window(11) == 0 and plots.smoothing_window(300) == 10


def test_accuracy_groups_read_flat_nested_and_suffixed_keys():
    assert accuracy_groups({"accuracy_before": 0.3, "accuracy_after": 0.5}) == {"greedy": (0.3, 0.5)}
    assert accuracy_groups(
        {
            "accuracy_before": {"greedy": 0.3, "sampled": 0.2},
            "accuracy_after": {"greedy": 0.5, "sampled": 0.4},
        }
    ) == {"greedy": (0.3, 0.5), "sampled": (0.2, 0.4)}
    assert accuracy_groups(
        {
            "accuracy_before": 0.3,
            "accuracy_after": 0.5,
            "accuracy_before_sampled": 0.1,
            "accuracy_after_sampled": 0.2,
        }
    ) == {"greedy": (0.3, 0.5), "sampled": (0.1, 0.2)}
    assert accuracy_groups({"accuracy_before": 0.3}) == {}


def _cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers())
    args = parser.parse_args(argv)
    return int(args.func(args))


def test_report_command_regenerates_and_errors_clearly(tmp_path, capsys):
    run = tmp_path / "run"
    _write_run(run, keys=("loss",), steps=5)
    assert _cli(["report", str(run)]) == 0
    assert "plot-loss" in (run / "report.html").read_text()
    assert str(run / "report.html") in capsys.readouterr().out
    with pytest.raises(DataError, match=r"metrics\.jsonl.*pass the folder of a training run"):
        _cli(["report", str(tmp_path / "empty")])


def test_flags_and_counts_are_not_plotted_and_skipped_steps_are_flagged(tmp_path):
    run = tmp_path / "run"
    _write_run(run, keys=("loss",), steps=4)
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write(
            json.dumps(
                {
                    "step": 5,
                    "split": "train",
                    "phase": 0,
                    "loss": 0.1,
                    "skipped": 1.0,
                    "tokens": 40,
                    "kto/z0": 0.2,
                }
            )
            + "\n"
        )
    html = write_report(run).read_text()
    assert "1 step(s) skipped" in html
    assert set(_pngs(html)) == {"loss", "other-0"}  # kto/z0 gets a plot of its own
    other = html.split('id="other"')[1].split("</p>")[0]
    assert "kto/z0" in other and "skipped" not in other and "tokens" not in other and "phase" not in other


def test_findings_name_over_optimisation_and_over_fitting_by_their_rules():
    from preftune.eval.diagnose import findings

    records = [
        {
            "step": s,
            "split": "train",
            "logps/chosen_per_token": -1.0 - 0.025 * (s - 1),
            "rewards/margin": 0.1 * s,
        }
        for s in range(1, 21)
    ]
    records += [{"step": 10 * i, "split": "eval", "loss": v} for i, v in enumerate((0.6, 0.5, 0.58), start=1)]
    notes = findings(records)
    # ends: mean of the first two (−1, −1.025) and of the last two (−1.45, −1.475) train values
    assert len(notes) == 2
    assert (
        "fell from -1.01 to -1.46 nats per token" in notes[0] and "while the reward margin grew" in notes[0]
    )
    assert "lowest at step 20 (0.5) and ended 16% higher (0.58)" in notes[1]
    flat = [{**r, "logps/chosen_per_token": -1.0} for r in records if r["split"] == "train"]
    assert findings(flat) == []  # chosen likelihood held, no eval loss: nothing to report


ONLINE_KEYS = (
    "loss", "reward", "accuracy", "kl", "ratio", "zero_signal_fraction", "completion_length",
    "rollout_s", "train_s", "grad_norm", "lr", "tokens_per_s", "examples_per_s",
)  # fmt: skip


def test_online_run_report_plots_reward_accuracy_kl_and_zero_signal(tmp_path):
    run = tmp_path / "run"
    summary = {"method": "grpo", "accuracy_before": 0.5, "accuracy_after": 0.6}
    _write_run(run, keys=ONLINE_KEYS, steps=9, summary=summary)  # 9: no eval records (online runs have none)
    html = write_report(run).read_text()
    pngs = _pngs(html)
    assert set(pngs) == {
        "accuracy", "loss", "online_reward", "online_kl", "zero_signal", "online_time", "optimisation",
        "throughput",
    }  # fmt: skip
    for sid in ("online_reward", "online_kl", "zero_signal"):
        assert imread(io.BytesIO(pngs[sid]), format="png").std() > 0.01, sid
    assert "Not plotted" not in html  # the pairwise sections are not missing: online runs never log them
    assert "Other logged metrics" not in html  # every online metric has its section
    assert "final sample accuracy (train)" in html
    offline = write_report(_copy_offline(tmp_path)).read_text()  # and the reverse: no online note
    assert "online_reward" not in offline and "zero_signal_fraction" not in offline


def _copy_offline(tmp_path: Path) -> Path:
    run = tmp_path / "offline"
    _write_run(run, keys=("loss", "rewards/chosen", "lr"), summary={"method": "simpo"})
    return run
