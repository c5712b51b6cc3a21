"""A distilled student improves: the quickstart's SFT → DPO pair (96×3 Llama, seed 0) is the teacher,
a smaller SFT model (64×2) the student; 300 steps of 16 of the quickstart's pairs (~4.4 epochs), lr 1e-4,
constant.
Each method must raise the student's greedy accuracy on the 1000 held-out prompts by ≥ 2 points:
DCKD; ADPA with the SFT term of the authors' trainer (`adpa:1,nll:1`) from the student; ADPA+
(the same from the DCKD result); AlignDistil. A method measured below that is a strict expected
failure with its number (docs/online.md, Distillation). Slow: prepare + DPO + the runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from measured_cases import measured_cases
from preftune.config import TrainConfig
from preftune.tasks.quickstart import Artifacts, QuickstartConfig, _load, prepare
from preftune.tasks.sft import SFTConfig, greedy_accuracy, train_sft
from preftune.train.api import train

CFG = QuickstartConfig()
# name → (objective, start): start "student" (the small SFT model) or "dckd" (ADPA+)
RUNS = {
    "dckd": ("dckd", "student"),
    "adpa": ("adpa:1,nll:1", "student"),
    "adpa_plus": ("adpa:1,nll:1", "dckd"),
    "aligndistil": ("aligndistil", "student"),
}
# measured once (docs/online.md; student 14.0 %, teacher 49.1 % → 58.4 %): dckd 17.6 % (+3.6), aligndistil
# 16.9 % (+2.9); below +2 points, strict xfails:
MEASURED: dict[str, str] = {
    "adpa": "measured 14.0 % → 12.7 % (−1.3)",
    "adpa_plus": "measured 14.0 % → 15.0 % (+1.0; DCKD 17.6 %)",
}
_DONE: dict[str, Path] = {}


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("distill_learning")
    art = prepare(root / "qs", seed=0, config=CFG, log=lambda _m: None)
    dpo = train(
        TrainConfig(
            method="dpo", model=str(art.sft_dir), data=str(art.pairs_path), out=str(root / "dpo"),
            hparams={"beta": CFG.beta}, max_steps=CFG.max_steps, batch_size=CFG.batch_size, lr=CFG.lr,
            progress=False, report=False,
        )
    ).final_dir  # fmt: skip
    student = train_sft(
        art.task, root / "student", SFTConfig(hidden_size=64, num_layers=2, seed=1, target_accuracy=0.3),
        exclude_prompts=set(art.heldout_prompts),
    ).model_dir  # fmt: skip
    _DONE["student"] = student
    return {"art": art, "teacher": dpo, "root": root, "before": _accuracy(student, art)}


def _accuracy(model_dir: Path, art: Artifacts) -> float:
    model, tokenizer = _load(model_dir, art.task)
    return float(greedy_accuracy(model, tokenizer, art.task, art.heldout_prompts, batch_size=128))


def _run(name: str, setup: dict[str, Any]) -> Path:
    if name not in _DONE:
        method, start = RUNS[name]
        art = setup["art"]
        result = train(
            TrainConfig(
                method=method, model=str(_run(start, setup)), data=str(art.pairs_path),
                teacher=str(setup["teacher"]), teacher_ref=None if method == "dckd" else str(art.sft_dir),
                out=str(setup["root"] / name), max_steps=300, batch_size=16, lr=1e-4, warmup_ratio=0.0,
                scheduler="constant", progress=False, report=False,
            )
        )  # fmt: skip
        _DONE[name] = result.final_dir
    return _DONE[name]


@pytest.mark.slow
@pytest.mark.timeout(0)  # tens of minutes on loaded cores
@pytest.mark.parametrize("name", measured_cases(RUNS, MEASURED))
def test_distilled_student_improves_on_arithmetic(name: str, setup: dict[str, Any]) -> None:
    after = _accuracy(_run(name, setup), setup["art"])
    print(f"{name}: student {setup['before']:.3f} -> {after:.3f}")
    assert after >= setup["before"] + 0.02, (name, setup["before"], after)
