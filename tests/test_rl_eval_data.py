"""An online run's `--eval-data`: held-out prompts whose greedy responses are scored by the run's
reward every `eval_every` steps and at the end (`split: eval`, `reward`), the same number that
`preftune eval RUN --prompts` reports for final/ afterwards. It was refused ("cannot use eval_data")."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from online_fixtures import online_root
from preftune.cli import main
from test_train_fixtures import write_jsonl


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = online_root(tmp_path_factory, "online_eval")
    write_jsonl(root / "heldout.jsonl", [{"prompt": f"{a}+{b}="} for a in (5, 6) for b in (7, 8, 9)])
    argv = [
        "train", "grpo", "--model", str(root / "model"), "--prompts", str(root / "prompts.jsonl"),
        "--reward", f"{root / 'rewards.py'}:digits", "--num-generations", "4", "--batch-size", "4",
        "--max-completion-length", "5", "--max-steps", "4", "--lr", "3e-3", "--no-progress", "--no-report",
        "--eval-data", str(root / "heldout.jsonl"), "--eval-every", "2", "--out", str(root / "grpo"),
    ]  # fmt: skip
    assert main(argv) == 0
    return root


def test_held_out_reward_is_logged_every_eval_every_steps(run: Path) -> None:
    records = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in records if r.get("split") == "eval"]
    assert [r["step"] for r in evals] == [2, 4]
    assert all(r["prompts"] == 6 and 0 <= r["reward"] <= 5 for r in evals)  # ≤ 5 digits in 5 tokens
    assert "accuracy" not in evals[0]  # not the 0/1 verifier


def test_the_last_eval_equals_preftune_eval_on_the_same_prompts(run: Path) -> None:
    argv = ["eval", str(run / "grpo"), "--prompts", str(run / "heldout.jsonl"), "--kl-samples", "0"]
    assert main(argv) == 0
    after = json.loads((run / "grpo" / "eval.json").read_text())["metrics"]["reward/after"]
    records = [json.loads(line) for line in (run / "grpo" / "metrics.jsonl").read_text().splitlines()]
    last = [r for r in records if r.get("split") == "eval"][-1]
    assert last["reward"] == pytest.approx(after, abs=1e-12)
