"""The tiny prompt/reward fixture of the online-method tests: a tiny model, twelve `a+b=` prompts and
rewards that have spread on a random model, written to a folder as `preftune train` reads them.

`online_root(tmp_path_factory, name)` builds the folder: `model/`, `prompts.jsonl` (rows of
`prompt_rows`) and `rewards.py` holding `digits`, `parity` and `constant` (the functions below, as
source, so that `--reward FILE:NAME` loads them).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import preftune.train.run as train_run
from test_train_fixtures import tiny_model, write_jsonl

REWARDS_SOURCE = (
    "def digits(prompts, completions, **kwargs):\n"
    "    return [float(sum(ch.isdigit() for ch in c)) for c in completions]\n"
    "def parity(prompts, completions, **kwargs):\n"
    "    return [float(sum(map(ord, c)) % 2) for c in completions]\n"
    "def constant(prompts, completions, **kwargs):\n"
    "    return [1.0 for c in completions]\n"
)


def digits_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """A reward with spread on a random tiny model: how many digits the completion holds."""
    return [float(sum(ch.isdigit() for ch in c)) for c in completions]


def parity_reward(prompts: list[str], completions: list[str], **kwargs: Any) -> list[float]:
    """A 0/1 reward with spread on a random tiny model: the parity of the completion's code points."""
    return [float(sum(map(ord, c)) % 2) for c in completions]


def prompt_rows(n: int = 12, *, teacher: bool = False) -> list[dict[str, Any]]:
    """`a+b=` prompts with their answer; `teacher`: a gold response in the pool (DNO's), the sum × 9."""
    rows: list[dict[str, Any]] = [
        {"prompt": f"{a}+{b}=", "answer": a + b} for a in range(4) for b in range(3)
    ]
    if teacher:
        rows = [{**row, "teacher": f"{row['answer']}" * 9} for row in rows]
    return rows[:n]


def online_root(factory: pytest.TempPathFactory, name: str, *, teacher: bool = False) -> Path:
    """A fresh folder with `model/`, `prompts.jsonl` and `rewards.py` (see the module docstring)."""
    root = factory.mktemp(name)
    tiny_model(root / "model")
    write_jsonl(root / "prompts.jsonl", prompt_rows(teacher=teacher))
    (root / "rewards.py").write_text(REWARDS_SOURCE)
    return root


def crash_in_call(monkeypatch: pytest.MonkeyPatch, call: int, run: Callable[[], object]) -> None:
    """`run()` with the training step raising on its `call`-th objective evaluation (a crash in the
    middle of a run, after the checkpoints before it were written); the real step is back afterwards."""
    real, calls = train_run.objective_on_batch, {"n": 0}

    def stopping(*a: Any, **kw: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == call:
            raise RuntimeError(f"stopped in step {call}")
        return real(*a, **kw)

    monkeypatch.setattr(train_run, "objective_on_batch", stopping)
    with pytest.raises(RuntimeError, match=f"step {call}"):
        run()
    monkeypatch.setattr(train_run, "objective_on_batch", real)
