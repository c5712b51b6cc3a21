"""Where a run's metrics go: metric sinks (a fake trackio module stands in for the real one)."""

from __future__ import annotations

import io
import re
import sys
import types
from pathlib import Path
from typing import Any

import pytest

from preftune.errors import ConfigError
from preftune.train.logging import MetricsLogger, Progress, check_sinks


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


METRICS = {
    "loss": 0.69314718,
    "rewards/accuracy": 0.75,
    "rewards/margin": 3.0571e-05,
    "rewards/chosen": 0.0123456,
    "rewards/rejected": -0.0123,
    "grad_norm": 1.25,
    "lr": 3.3333e-07,
    "tokens_per_s": 1234.56,
    "examples_per_s": 10.0,
}


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_without_a_terminal_a_plain_complete_line_every_log_every_steps() -> None:
    from rich.console import Console

    out = io.StringIO()
    clock = FakeClock()
    bar = Progress(5, enabled=True, log_every=2, console=Console(file=out), clock=clock)
    for step in range(1, 6):
        clock.now += 5.0  # 5 s per step
        bar.update(step, METRICS)
    bar.print("a message with [brackets] that is longer than eighty columns, never wrapped or cut by rich")
    bar.close()
    lines = out.getvalue().splitlines()
    metrics = (
        "loss=0.6931  rewards/accuracy=0.75  rewards/margin=3.057e-05  rewards/chosen=0.01235  "
        "rewards/rejected=-0.0123  grad_norm=1.25  lr=3.333e-07  tokens/s=1235"
    )
    assert lines == [
        f"step 2/5  {metrics}  elapsed 0:00:10  eta 0:00:15",  # 10 s for 2 steps, 3 to go
        f"step 4/5  {metrics}  elapsed 0:00:20  eta 0:00:05",
        f"step 5/5  {metrics}  elapsed 0:00:25  eta 0:00:00",  # the last step is always logged
        "a message with [brackets] that is longer than eighty columns, never wrapped or cut by rich",
    ]


def test_a_resumed_run_estimates_from_its_own_steps() -> None:
    from rich.console import Console

    out, clock = io.StringIO(), FakeClock()
    bar = Progress(10, enabled=True, start=6, console=Console(file=out), clock=clock)
    clock.now += 4.0
    bar.update(8, {"loss": 1.0})
    assert out.getvalue() == "step 8/10  loss=1  elapsed 0:00:04  eta 0:00:04\n"


def test_on_an_80_column_terminal_the_bar_keeps_every_number() -> None:
    from rich.console import Console

    out = io.StringIO()
    console = Console(file=out, force_terminal=True, width=80, color_system=None)
    bar = Progress(1000, enabled=True, console=console)
    assert bar._bar is not None  # a terminal gets the live bar, not log lines
    bar.update(999, METRICS)
    bar.close()
    text = out.getvalue()
    assert "…" not in text  # nothing is cut
    assert "999/1000" in text and "eta" in text
    for piece in ("loss=0.6931", "rewards/margin=3.057e-05", "lr=3.333e-07", "tokens/s=1235"):
        assert piece in text
    plain = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text).replace("\r", "\n")
    assert max(len(line) for line in plain.splitlines()) <= 80


def test_disabled_progress_prints_nothing(capsys: pytest.CaptureFixture[str]) -> None:
    bar = Progress(3, enabled=False)  # ranks other than 0
    bar.update(3, METRICS)
    bar.print("hello")
    bar.close()
    assert capsys.readouterr().out == ""


def test_other_ranks_leave_notices_and_warnings_to_rank_0() -> None:
    import subprocess

    code = (
        "import logging, warnings\n"
        "from preftune.train.logging import quiet_other_ranks\n"
        "logging.getLogger('preftune.data').warning('before')\n"
        "quiet_other_ranks()\n"
        "logging.getLogger('preftune.data').warning('summary')\n"
        "logging.getLogger('preftune.train').warning('kto splits pairs')\n"
        "warnings.warn('a FutureWarning', FutureWarning)\n"
        "logging.getLogger('preftune.train').error('an error')\n"
    )
    src = str(Path(__file__).resolve().parents[1] / "src")
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env={"PYTHONPATH": src}
    )
    assert out.returncode == 0 and out.stdout == ""
    assert out.stderr.splitlines() == ["before", "an error"]


def test_a_step_without_an_optimizer_step_says_skipped_on_the_console() -> None:
    """metrics.jsonl recorded `skipped: 1`; the console showed `loss=0 ... tokens/s=0` only."""
    from preftune.train.logging import metrics_text

    assert metrics_text({"loss": 0.0, "skipped": 1.0}) == "loss=0  skipped"
    assert metrics_text({"loss": 0.5, "skipped": 0.0}) == "loss=0.5"


def test_an_image_run_shows_images_per_second_not_tokens() -> None:
    """A diffusion run counts images: its line says images/s (two per pair), never tokens/s."""
    from preftune.train.logging import metrics_text

    image_run = {k: v for k, v in METRICS.items() if k != "tokens_per_s"} | {"images_per_s": 20.0}
    text = metrics_text(image_run)
    assert text.endswith("lr=3.333e-07  images/s=20") and "tokens" not in text


def test_the_command_line_drops_transformers_torchvision_advice_and_only_that() -> None:
    """Importing diffusers' pipelines makes transformers log, once per class, that `CLIPImageProcessor`
    requires torchvision and falls back to its PIL class — noise on every diffusion command. The
    command line's `quiet_libraries` filters that message at its logger; other messages of the same
    logger pass, and a second call adds no second filter."""
    import logging

    from preftune.train.logging import quiet_libraries

    source = logging.getLogger("transformers.utils.import_utils")
    before = list(source.filters)
    try:
        quiet_libraries()
        quiet_libraries()
        ours = [f for f in source.filters if type(f).__name__ == "_NoTorchvisionFallback"]
        assert len(ours) == 1  # (an earlier command-line test of this session may have added it)

        def record(message: str) -> logging.LogRecord:
            return logging.LogRecord(source.name, logging.WARNING, __file__, 1, message, None, None)

        advice = "`CLIPImageProcessor` requires torchvision (not installed); falling back to `CLIPImageProcessorPil`"
        assert not source.filter(record(advice))
        assert source.filter(record("Could not load something else"))
    finally:
        source.filters[:] = before
