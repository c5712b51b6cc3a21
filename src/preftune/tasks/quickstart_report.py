"""The quickstart's report parts: its numbered stage lines, the table of held-out answers before and
after training (checked by the verifier) and report.html with the task's statistics."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from preftune.tasks.arithmetic import ArithmeticTask

Log = Callable[[str], None]


class Stages:
    """The numbered stage lines of a run of `total` stages: each call logs "[k/total] message", k
    counting the calls, so stages a run skips leave no gap in the numbers."""

    def __init__(self, total: int, log: Log) -> None:
        self.total, self.log, self.done = total, log, 0

    def __call__(self, message: str) -> None:
        self.done += 1
        self.log(f"[{self.done}/{self.total}] {message}")


def prepare_stages(with_pairs: bool) -> int:
    """Stages of the quickstart's preparation: SFT, [sampling the pairs,] writing the data and
    measuring the SFT model."""
    return 3 if with_pairs else 2


def sample_table(task: ArithmeticTask, prompts: list[str], before: list[str], after: list[str]) -> str:
    """A few held-out prompts with the greedy answer before and after training, checked by the verifier."""
    blocks = []
    for p, b, a in zip(prompts, before, after):
        rows = [f"prompt: {p.strip()}"]
        for name, text in (("before", b), ("after", a)):
            v = task.verify(p, text)
            mark = "right" if v.fully_correct else "answer right" if v.correct else "wrong"
            where = "" if v.first_error is None else f" (line {v.first_error}: {v.reason})"
            rows.append(f"{name} [{mark}{where}]:\n  " + text.replace("\n", "\n  "))
        blocks.append("\n".join(rows))
    return "\n\n".join(blocks)


def write_report(out: Path, samples: str, stats: dict[str, Any], log: Log) -> None:
    """report.html of the quickstart run in `out`, with the sample table and the task's statistics."""
    try:
        from preftune.eval.report import write_report as write_run_report

        write_run_report(out, extra={"held-out samples (greedy)": samples, **flat(stats)})
    except ImportError as err:  # the report module is optional for the numbers above
        log(f"      (no report: {err})")


def flat(stats: dict[str, Any]) -> dict[str, Any]:
    """Nested stats as 'a.b' → value, for the report's details table."""
    flattened: dict[str, Any] = {}
    for k, v in stats.items():
        if isinstance(v, dict):
            flattened.update({f"{k}.{kk}": vv for kk, vv in v.items()})
        else:
            flattened[k] = v
    return flattened
