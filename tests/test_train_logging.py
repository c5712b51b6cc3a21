"""Where a run's metrics go: metric sinks (a fake trackio module stands in for the real one)."""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

import pytest

from preftune.errors import ConfigError
from preftune.train.logging import MetricsLogger, check_sinks


def fake_trackio(calls: list[tuple[str, Any]]) -> types.ModuleType:
    module = types.ModuleType("trackio")
    module.init = lambda **kw: calls.append(("init", kw))  # type: ignore[attr-defined]
    module.log = lambda metrics, step=None: calls.append(("log", (metrics, step)))  # type: ignore[attr-defined]
    module.finish = lambda: calls.append(("finish", None))  # type: ignore[attr-defined]
    return module


def test_trackio_is_a_sink_like_the_others(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[str, Any]] = []
    monkeypatch.setitem(sys.modules, "trackio", fake_trackio(calls))
    check_sinks(["trackio"])
    log = MetricsLogger(tmp_path, sinks=["trackio"], run_name="run7", config={"lr": 0.1})
    log.log({"step": 3, "split": "train", "loss": 0.5, "phase": 0, "note": "text"})
    log.close()
    assert calls == [
        ("init", {"project": "preftune", "name": "run7", "config": {"lr": 0.1}}),
        ("log", ({"train/loss": 0.5, "train/phase": 0.0}, 3)),
        ("finish", None),
    ]


def test_trackio_not_installed_is_a_config_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "trackio", None)  # import trackio → ImportError
    with pytest.raises(ConfigError, match=r"'trackio' is not installed — pip install 'preftune\[trackio\]'"):
        check_sinks(["trackio"])
