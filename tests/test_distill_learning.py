"""A distilled student improves: the quickstart's SFT → DPO pair is the teacher (96×3 Llama), a smaller
SFT model (64×2) the student; DCKD on the quickstart's pairs raises the student's greedy accuracy on
the 1000 held-out prompts; ADPA from the DCKD result (ADPA+) does not, on this task (measured and
checked, docs/online.md). Slow: ~20-30 minutes on 2 loaded cores."""

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
@pytest.mark.timeout(0)  # ~30 minutes on loaded cores
def test_dckd_student_improves_and_adpa_plus_is_measured_on_arithmetic(tmp_path: Path) -> None:
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
    results = {}
    for name, method, lr in (("adpa_lr1e-5", "adpa", 1e-5), ("dckd+adpa", "dckd:1,adpa:1", 1e-4)):
        run = train(TrainConfig(method=method, model=str(dckd.final_dir), out=str(tmp_path / name),
                                teacher_ref=str(teacher / "sft"), **{**common, "lr": lr}))  # type: ignore[arg-type]  # fmt: skip
        results[name] = _accuracy(run.final_dir, task, heldout)
    after = max(results.values())
    print(f"teacher {summary['accuracy_after']}, student SFT {before:.3f} → DCKD {mid:.3f} → {results}")
    # measured once (load 15-20): SFT 0.286 → DCKD 0.344; from DCKD, ADPA at lr 1e-5 0.087 and
    # dckd:1,adpa:1 0.170 (ADPA at lr 1e-4: 0.004): the advantage term alone collapses this student
    assert mid > before + 0.02, (before, mid)
    assert after < mid, "ADPA improved on DCKD: update docs/online.md (Distillation, measured)"
