"""A distilled student improves: the quickstart's SFT → DPO pair is the teacher (96×3 Llama), a smaller
SFT model (64×2) the student; DCKD, then ADPA (ADPA+) on the quickstart's pairs raises the student's
greedy accuracy on the 1000 held-out prompts (slow: ~15 minutes on 2 loaded cores)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from preftune.config import TrainConfig
from preftune.tasks.quickstart import QuickstartConfig, _load, run_quickstart
from preftune.tasks.sft import SFTConfig, greedy_accuracy, train_sft
from preftune.train.api import train


def _accuracy(model_dir: Path, task: object, prompts: list[str]) -> float:
    model, tokenizer = _load(model_dir, task)  # type: ignore[arg-type]
    return float(greedy_accuracy(model, tokenizer, task, prompts, batch_size=128))  # type: ignore[arg-type]


@pytest.mark.slow
def test_adpa_plus_student_improves_on_arithmetic(tmp_path: Path) -> None:
    torch.set_num_threads(1)
    teacher = tmp_path / "teacher"
    summary = run_quickstart(
        teacher, method="dpo", seed=0, config=QuickstartConfig(), log=lambda _: None, progress=False
    )
    from preftune.tasks.arithmetic import ArithmeticTask

    task = ArithmeticTask()
    heldout = [
        json.loads(line)["prompt"] for line in (teacher / "data" / "heldout.jsonl").read_text().splitlines()
    ]
    student = train_sft(task, tmp_path / "student", SFTConfig(hidden_size=64, num_layers=2, seed=1, target_accuracy=0.3),
                        exclude_prompts=set(heldout)).model_dir  # fmt: skip
    before = _accuracy(student, task, heldout)
    common = dict(data=str(teacher / "data" / "pairs.jsonl"), teacher=str(teacher / "final"), max_steps=60,
                  batch_size=16, lr=1e-4, warmup_ratio=0.0, scheduler="constant", progress=False, report=False)  # fmt: skip
    dckd = train(TrainConfig(method="dckd", model=str(student), out=str(tmp_path / "dckd"), **common))  # type: ignore[arg-type]
    mid = _accuracy(dckd.final_dir, task, heldout)
    adpa = train(TrainConfig(method="adpa", model=str(dckd.final_dir), out=str(tmp_path / "adpa"),
                             teacher_ref=str(teacher / "sft"), **common))  # type: ignore[arg-type]  # fmt: skip
    after = _accuracy(adpa.final_dir, task, heldout)
    print(
        f"teacher {summary['accuracy_after']}, student SFT {before:.3f} → DCKD {mid:.3f} → ADPA+ {after:.3f}"
    )
    assert after > before, (before, mid, after)
