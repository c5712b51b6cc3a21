"""Where metrics go: OUT/metrics.jsonl always, a rich progress bar, and optional sinks.

TensorBoard, Weights & Biases, MLflow and Trackio are used only when asked for (`report_to`) and installed;
asking for one that is not installed is a ConfigError before any model loads, never a silent no-op.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.errors import ConfigError, DataError

SINK_PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb", "mlflow": "mlflow", "trackio": "trackio"}
PROGRESS_KEYS = (
    "loss",
    "rewards/accuracy",
    "rewards/margin",
    "rewards/chosen",
    "rewards/rejected",
    "reward",  # online methods: the samples' mean reward, verifier accuracy, groups without signal, ...
    "accuracy",
    "zero_signal_fraction",
    "kl",
    "completion_length",
    "rollout_s",
    "train_s",
    "grad_norm",
    "lr",
    "tokens_per_s",
    "images_per_s",  # diffusion runs: images (a pair is two) per second
)


def check_sinks(names: list[str]) -> None:
    """Raise ConfigError for a requested sink whose package is missing."""
    for name in names:
        package = SINK_PACKAGES.get(name)
        if package is None:
            raise ConfigError(f"report_to: unknown sink '{name}' (known: {', '.join(SINK_PACKAGES)})")
        if not _installed(package):
            raise ConfigError(
                f"report_to: '{name}' is not installed — pip install 'preftune[{name}]' "
                f"or remove it from report_to"
            )


def _installed(package: str) -> bool:
    if package in sys.modules:  # already imported (or provided in sys.modules)
        return sys.modules[package] is not None
    return importlib.util.find_spec(package) is not None


def _clean(record: dict[str, Any]) -> dict[str, Any]:
    """JSON-safe: non-finite floats become null (the JSON standard has no NaN)."""
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in record.items()}


class MetricsLogger:
    """Append one JSON object per line to OUT/metrics.jsonl and forward numbers to the sinks."""

    def __init__(
        self, out: Path, *, sinks: list[str], run_name: str, config: dict[str, Any], enabled: bool = True
    ) -> None:
        self.enabled = enabled
        self.path = out / "metrics.jsonl"
        self._sinks: list[Any] = []
        if not enabled:
            return
        check_sinks(sinks)
        for name in sinks:
            self._sinks.append(_open_sink(name, out, run_name, config))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        try:
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps(_clean(record)) + "\n")
        except OSError as err:  # (a full disk fails in the flush, whose error names no file)
            raise OSError(err.errno, err.strerror, str(self.path)) from err
        step, split = int(record.get("step", 0)), record.get("split", "train")
        numbers = {
            f"{split}/{k}": float(v)
            for k, v in record.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step"
        }
        for sink in self._sinks:
            sink(numbers, step)

    def truncate_after(self, step: int) -> str | None:
        """Drop records after `step` (a resumed run redoes them; no step is logged twice).

        A partial last line (a kill in the middle of a write) is dropped too; the returned note says
        so. Any other line that is not a JSON object is an error naming it."""
        if not self.enabled or not self.path.is_file():
            return None
        lines = self.path.read_text(encoding="utf-8").splitlines()
        while lines and not lines[-1].strip():
            lines.pop()
        note = None
        records = []
        for row, line in enumerate(lines, start=1):
            try:
                rec = json.loads(line) if line.strip() else None
            except json.JSONDecodeError:
                rec = "bad"
            if rec is None:
                continue
            if not isinstance(rec, dict):
                if row < len(lines):
                    raise DataError(
                        "not a JSON object: the metrics log is damaged",
                        path=str(self.path),
                        row=row,
                        fix="delete that line (the run's weights do not depend on the log) and resume again",
                    )
                note = f"{self.path}: dropped the partial last record (line {row}) of an interrupted write"
                continue
            if rec.get("step", 0) <= step:
                records.append(line)
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in records), encoding="utf-8")
        tmp.replace(self.path)
        return note

    def close(self) -> None:
        for sink in self._sinks:
            getattr(sink, "close", lambda: None)()


class _Sink:
    def __init__(self, write: Any, close: Any) -> None:
        self._write, self.close = write, close

    def __call__(self, numbers: dict[str, float], step: int) -> None:
        self._write(numbers, step)


def _open_sink(name: str, out: Path, run_name: str, config: dict[str, Any]) -> _Sink:
    if name == "tensorboard":
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(log_dir=str(out / "tensorboard"))

        def write_tb(numbers: dict[str, float], step: int) -> None:
            for k, v in numbers.items():
                writer.add_scalar(k, v, step)

        return _Sink(write_tb, writer.close)
    if name == "wandb":
        import wandb

        run = wandb.init(name=run_name, config=config, dir=str(out))
        return _Sink(lambda numbers, step: run.log(numbers, step=step), run.finish)
    if name == "trackio":
        import trackio

        trackio.init(project="preftune", name=run_name, config=config)
        return _Sink(lambda numbers, step: trackio.log(numbers, step=step), trackio.finish)
    import mlflow

    mlflow.start_run(run_name=run_name)
    mlflow.log_params({k: str(v)[:250] for k, v in config.items()})
    return _Sink(
        lambda numbers, step: mlflow.log_metrics(
            {k.replace("/", "_"): v for k, v in numbers.items()}, step=step
        ),
        mlflow.end_run,
    )


class _NoTorchvisionFallback(logging.Filter):
    """transformers' "`CLIPImageProcessor` requires torchvision (not installed); falling back to
    `CLIPImageProcessorPil`", printed when diffusers' pipelines are imported: advice for code that
    builds image processors, which preftune never does."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "requires torchvision (not installed)" not in record.getMessage()


def quiet_libraries() -> None:
    """For the command line: no per-file "Loading weights" bars from transformers, no FutureWarnings
    from the libraries underneath (deprecation notices for their API's users, not for someone
    running preftune) and no torchvision advice on importing diffusers. The Python API leaves all
    three alone."""
    warnings.filterwarnings("ignore", category=FutureWarning)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    source = logging.getLogger("transformers.utils.import_utils")
    if not any(isinstance(f, _NoTorchvisionFallback) for f in source.filters):
        source.addFilter(_NoTorchvisionFallback())


def quiet_other_ranks() -> None:
    """On a rank other than 0: leave warnings and preftune's notices (data summaries, dropped rows, ...)
    to rank 0. Every rank reads the same data and would print the same lines once per process;
    errors still show on every rank."""
    logging.getLogger("preftune").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()


def clock_text(seconds: float) -> str:
    """H:MM:SS, as rich's time columns show it."""
    whole = max(0, int(round(seconds)))
    return f"{whole // 3600}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def metrics_text(metrics: dict[str, Any]) -> str:
    """The key metrics, full names and numbers (never cut): 'loss=0.6931  rewards/accuracy=1  ...'."""
    parts = []
    for key in PROGRESS_KEYS:
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            shown = f"{value:.0f}" if key == "tokens_per_s" else f"{value:.4g}"
            parts.append(f"{key.replace('_per_s', '/s')}={shown}")
    if metrics.get("skipped"):  # no optimizer step: a non-finite loss, or nothing to train on
        parts.append("skipped")
    return "  ".join(parts)


class Progress:
    """How a run reports its steps (rank 0 only: `enabled`).

    On a terminal (and `live`): a rich bar — step/total, elapsed, ETA — with the key metrics on their
    own line(s) below it, wrapped rather than cut, so an 80-column terminal shows every number.
    Otherwise (nohup, CI, SLURM, `| tee`, or progress=false): one plain, complete line every
    `log_every` steps and at the last step: step/total, metrics, lr, tokens/s, elapsed, ETA.
    """

    def __init__(
        self,
        total: int,
        *,
        enabled: bool,
        start: int = 0,
        live: bool = True,
        log_every: int = 1,
        console: Any = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._bar: Any = None
        self.enabled, self.total, self.log_every = enabled, total, max(1, log_every)
        self._start_step, self._clock = start, clock
        self._t0 = clock()
        if not enabled:
            return
        from rich.console import Console

        self._console = console if console is not None else Console()
        if live and self._console.is_terminal:
            self._bar = _live_bar(self._console)
            self._task = self._bar.add_task("train", total=total, completed=start)
            self._bar.start()

    def update(self, step: int, metrics: dict[str, Any]) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.info = metrics_text(metrics)
            self._bar.update(self._task, completed=step)
        elif step % self.log_every == 0 or step == self.total:
            print(self.line(step, metrics), file=self._console.file, flush=True)

    def line(self, step: int, metrics: dict[str, Any]) -> str:
        """The plain log line of `step`: 'step 2/5  loss ...  elapsed 0:00:10  eta 0:00:15'."""
        elapsed = self._clock() - self._t0
        done = step - self._start_step
        eta = elapsed / done * (self.total - step) if done > 0 else 0.0
        body = metrics_text(metrics)
        return (
            f"step {step}/{self.total}  {body}{'  ' if body else ''}"
            f"elapsed {clock_text(elapsed)}  eta {clock_text(eta)}"
        )

    def print(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:  # above the live bar, wrapped at words; markup off: paths keep [ ]
            self._bar.console.print(text, markup=False, highlight=False)
        else:
            print(text, file=self._console.file, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()


def _live_bar(console: Any) -> Any:
    """A rich Progress whose key-metrics text sits on its own line under the bar."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.progress import Progress as RichProgress
    from rich.text import Text

    class Bar(RichProgress):
        info = ""

        def get_renderables(self) -> Any:
            yield self.make_tasks_table(self.tasks)
            if self.info:
                yield Text(self.info, overflow="fold")

    return Bar(
        TextColumn("[bold]train"),
        BarColumn(bar_width=30),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("eta"),
        TimeRemainingColumn(),
        console=console,
        transient=False,
    )
