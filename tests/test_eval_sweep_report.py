"""The sweep page's pieces: each method's own settings next to the shared ones (an online method's
schedule is not the offline one), tables that fit a page, and bar axes drawn from the data."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import pytest

from preftune.config import TrainConfig
from preftune.eval.plots import bar_axis_range
from preftune.eval.sweep import MethodResult, SweepTask, run_sweep
from preftune.eval.sweep_report import metric_tables, settings_tables, task_change


def _rows(table_html: str) -> dict[str, str]:
    """first cell → second cell of each body row."""
    return dict(re.findall(r"<tr><td>([^<]*)</td><td>([^<]*)</td></tr>", table_html))


def test_a_mixed_sweep_shows_each_methods_own_schedule_and_shares_only_what_is_shared(tmp_path: Path) -> None:
    base = TrainConfig(model="m", data="d.jsonl", out="x", max_steps=20, lr=3e-5, batch_size=8, seed=3)
    online = {
        "prompts": "p.jsonl",
        "reward": "arithmetic",
        "max_steps": 100,
        "lr": 5e-5,
        "num_generations": 4,
    }
    task = SweepTask([], online=online, online_hparams={"raft": {"keep": 0}})

    def train(config: TrainConfig):
        return SimpleNamespace(final_dir=Path(config.out), steps=config.max_steps, metrics={})

    result = run_sweep(["dpo", "grpo", "rloo", "raft"], base, tmp_path / "s", task=task, train_fn=train,
                       log=lambda _m: None)  # fmt: skip
    by = {r.method: r for r in result.results}
    assert by["dpo"].settings == {}
    assert by["grpo"].settings == {"data": None, "prompts": "p.jsonl", "reward": "arithmetic",
                                   "max_steps": 100, "lr": 5e-5, "num_generations": 4}  # fmt: skip
    assert by["raft"].settings == {**by["grpo"].settings, "hparams.keep": 0}
    page = settings_tables(result)
    own, shared = page.split("<h3>Shared by every method</h3>")
    rows = _rows(own)
    # dpo: the shared config's values of the keys the online methods set, but none that only online
    # methods read (num_generations, prompts, reward)
    assert rows == {
        "dpo": "data = d.jsonl; lr = 3.000e-05; max_steps = 20",
        "grpo, rloo": "lr = 5.000e-05; max_steps = 100; num_generations = 4; prompts = p.jsonl; reward = arithmetic",
        "raft": "hparams.keep = 0; lr = 5.000e-05; max_steps = 100; num_generations = 4; prompts = p.jsonl; "
        "reward = arithmetic",
    }
    shared_rows = _rows(shared)
    assert shared_rows["model"] == "m" and shared_rows["seed"] == "3"
    assert not {"max_steps", "lr", "data", "num_generations"} & set(shared_rows)
    assert (tmp_path / "s" / "sweep.html").read_text().count("<h3>Shared by every method</h3>") == 1


def test_online_only_fields_are_those_pair_methods_ignore() -> None:
    from preftune.config_fields import online_only_fields

    fields = online_only_fields()
    assert {"prompts", "reward", "num_generations", "temperature", "kl_coef", "macro", "dpo_model"} <= fields
    assert not {"lr", "max_steps", "data", "model", "beta", "batch_size", "hparams"} & fields


def test_an_offline_only_sweep_has_one_shared_table() -> None:
    result = SimpleNamespace(
        results=[MethodResult("dpo", "a"), MethodResult("ipo", "b")], config={"max_steps": 20, "lr": 3e-5}
    )
    page = settings_tables(result)  # type: ignore[arg-type]
    assert "their settings" not in page and _rows(page) == {"max_steps": "20", "lr": "3.000e-05"}


def test_the_training_metrics_are_one_table_per_kind_of_method() -> None:
    dpo = MethodResult("dpo", "a", metrics={"loss": 0.5, "eval/loss": 0.6, "eval/rewards/accuracy": 0.7})
    grpo = MethodResult("grpo", "b", metrics={"loss": 0.1, "reward": 0.3, "zero_signal_fraction": 0.25})
    failed = MethodResult("ipo", "c", status="failed")
    tables = metric_tables([dpo, grpo, failed])
    assert [(t[0].split()[0], t[1], [r[0] for r in t[2]]) for t in tables] == [
        ("preference-pair", ["method", "train loss", "eval loss", "eval reward acc."], ["dpo"]),
        ("online", ["method", "train loss", "sample reward", "zero-signal frac."], ["grpo"]),
    ]
    assert tables[0][2][0][3] == "70.0%" and tables[1][2][0][3] == "25.0%"


def test_bar_axes_span_the_data_not_a_fixed_range() -> None:
    # 61.2 and 63.4 %: span 2.2, margin max(0.2 · 2.2, 1) = 1 → a 4.2-point axis where 0–100 showed nothing
    assert bar_axis_range([61.2, 63.4]) == pytest.approx((60.2, 64.4))
    # values near 0 keep 0 as the bars' start: 5 ≤ 2 · 35
    assert bar_axis_range([5.0, 40.0]) == pytest.approx((0.0, 47.0))
    # all below 0 (changes from the reference): bars hang from 0; margin 0.2 · 17.4 = 3.48
    assert bar_axis_range([-1.3, -18.7]) == pytest.approx((-22.18, 0.0))


def test_task_bars_are_changes_from_the_reference_labelled_with_the_score() -> None:
    change, labels = task_change({"dpo": 0.634, "ipo": 0.231}, 0.552, percent=True)
    assert change == pytest.approx({"dpo": 8.2, "ipo": -32.1})
    assert labels == {"dpo": "63.4% (+8.2)", "ipo": "23.1% (-32.1)"}
    change, labels = task_change({"dpo": 0.71}, 0.70, percent=False)  # a mean reward: no points
    assert change == pytest.approx({"dpo": 0.01}) and labels == {"dpo": "0.7100 (+0.0100)"}


def test_a_sweep_without_a_task_says_accuracy_and_kl_were_not_measured(tmp_path: Path) -> None:
    def train(config: TrainConfig):
        return SimpleNamespace(final_dir=Path(config.out), steps=config.max_steps, metrics={"loss": 0.5})

    base = TrainConfig(model="m", data="d.jsonl", out="x", max_steps=2)
    run_sweep(["dpo", "ipo"], base, tmp_path / "s", train_fn=train, log=lambda _m: None)
    page = (tmp_path / "s" / "sweep.html").read_text()
    assert "No held-out task was given, so task accuracy and KL were not measured." in page
    assert "measured on none" not in page
