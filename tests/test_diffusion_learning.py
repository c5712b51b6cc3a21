"""Every offline diffusion method on the built-in shapes task: does the held-out mean reward rise?

The task is the quickstart's (`preftune.tasks.diffusion_sweep`): a tiny pipeline pretrained on
coloured squares, reward-ranked pairs of its samples, 256 held-out samples (16 prompts × 16 seeds).
Each method trains with the quickstart's schedule (150 steps of 16 pairs, lr 5e-5, full
fine-tuning; diff_kto on 64 images per step, SCHEDULES) on the quickstart's pairs (217 for seed 0)
and its own registered defaults (β = 5000 for dpo/hinge on a pipeline folder, `DIFFUSION_DEFAULTS`;
the pairs carry each image's standardised
reward, which smpo reads as its score), plus variants (VARIANTS);
the gain is paired per (prompt, seed) — DDIM is deterministic, so a sample before and after
training start from the same noise — and must exceed GAIN_IN_SE standard errors.
Measured gains are in docs/diffusion.md ("Learning test").

Set PREFTUNE_TEST_TASK_DIR to a folder to reuse the prepared task between pytest sessions.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import pytest
import torch

from preftune.tasks.diffusion_sweep import two_caption_pairs

pytestmark = pytest.mark.usefixtures("one_thread")

GAIN_IN_SE = 3.0

# Every offline method `preftune train METHOD --model PIPELINE_FOLDER` runs on image pairs. DCPO is
# not a loss of its own (Diffusion-DPO with per-branch captions): it is the "dcpo" variant below.
OFFLINE_METHODS = ["dpo", "hinge", "ipo", "diff_kto", "mapo", "inpo", "smpo", "seppo", "pso"]

# Measured on this task (docs/diffusion.md, "Learning test"; seed 0, the quickstart's 212 pairs, 4
# December 2026): what does not raise the reward is kept as a strict xfail with its numbers, so that a
# change that makes it pass is noticed.
NOT_MET = {
    "seppo": pytest.mark.xfail(
        strict=True,
        reason="measured 0.4798 → 0.4773, gain −0.0026 ± 0.0006 (−4.0 s.e.) on the quickstart's 212 pairs "
        "(3 December, on the 217 pairs of that day's pretraining: −7.9; aaf=v2, the revised paper's "
        "SFT: −7.1; at β 500: −5.8); without the flipper it rose (+3.9 s.e.): the flip, decided on one "
        "noisy draw, fits the model's own past samples",
    ),
    "pso-20-steps": pytest.mark.xfail(
        strict=True,
        reason="measured 0.4798 → 0.4824, gain +0.0025 ± 0.0015 (+1.7 s.e.) on the quickstart's 212 pairs "
        "(on 3 December's 217 pairs: +15.4); pso at its 4-step default rose (+6.6)",
    ),
}
# Cases beyond each method at its defaults: (method, hyper-parameters).
VARIANTS: dict[str, tuple[str, dict[str, object]]] = {
    "seppo-no-aaf": ("seppo", {"aaf": "off"}),  # the paper's "w/o AAF" ablation
    "pso-20-steps": ("pso", {"sample_steps": 20}),  # reference images at the task's 20 DDIM steps
    "dcpo": ("dpo", {"beta": 500.0}),  # DCPO: Diffusion-DPO at its β on two-caption rows (DATA)
    "diff_kto-batch-16": ("diff_kto", {}),  # the quickstart's 16 images per step (SCHEDULES)
}
# Cases trained on another schedule than the quickstart's (TrainConfig fields). Diffusion-KTO averages
# each update over a large batch of unpaired images (the official recipe: 2048, by gradient
# accumulation); here 64, four micro-batches of 16, as many steps — the data has 214 images.
SCHEDULES: dict[str, dict[str, object]] = {"diff_kto": {"batch_size": 64, "micro_batch_size": 16}}
# Cases that train on other rows made from the task's pairs.
DATA = {"dcpo": two_caption_pairs}
CASES = [*OFFLINE_METHODS, *VARIANTS]
PARAMS = [pytest.param(c, marks=NOT_MET[c]) if c in NOT_MET else c for c in CASES]


def test_the_learning_test_covers_every_diffusion_loss() -> None:
    """A loss added to the diffusion module must join OFFLINE_METHODS (or this list must say why not)."""
    from preftune import losses
    from preftune.losses import diffusion_losses

    registered = {
        name for name, spec in losses.REGISTRY.items() if spec.fn.__module__ == diffusion_losses.__name__
    }
    assert registered <= set(OFFLINE_METHODS), sorted(registered - set(OFFLINE_METHODS))


@pytest.fixture(scope="module")
def shapes_task(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    from preftune.tasks.diffusion_quickstart import DiffusionQuickstartConfig, heldout
    from preftune.tasks.diffusion_sweep import diffusion_sweep_task

    folder = Path(os.environ.get("PREFTUNE_TEST_TASK_DIR") or tmp_path_factory.mktemp("shapes-task"))
    cfg = DiffusionQuickstartConfig()
    values, _ = diffusion_sweep_task(folder, seed=0, config=cfg, log=print)
    before = heldout(Path(values["model"]), cfg, 0)[2]
    return {"values": values, "before": before, "cfg": cfg, "folder": folder}


@pytest.mark.slow
@pytest.mark.timeout(0)  # the first also pretrains the task: over 10 minutes on loaded cores
@pytest.mark.parametrize("case", PARAMS)
def test_offline_method_raises_heldout_reward(
    shapes_task: dict[str, object], tmp_path: Path, case: str
) -> None:
    from preftune.config import TrainConfig
    from preftune.tasks.diffusion_quickstart import heldout
    from preftune.train.api import train

    method, hparams = VARIANTS.get(case, (case, {}))
    values: dict[str, object] = dict(shapes_task["values"])  # type: ignore[call-overload]
    values.update(SCHEDULES.get(case, {}))
    if case in DATA:
        values["data"] = str(DATA[case](Path(str(values["data"]))))
    result = train(
        TrainConfig(
            method=method, out=str(tmp_path / case), cache_dir=str(tmp_path / "cache"), progress=False,
            report=False, hparams=hparams, **values,  # type: ignore[arg-type]
        )
    )  # fmt: skip
    before: torch.Tensor = shapes_task["before"]  # type: ignore[assignment]
    after = heldout(result.final_dir, shapes_task["cfg"], 0)[2]  # type: ignore[arg-type]
    gain = after - before
    mean, se = float(gain.mean()), float(gain.std() / math.sqrt(gain.numel()))
    line = (
        f"{case}: held-out reward {float(before.mean()):.4f} → {float(after.mean()):.4f}, paired gain "
        f"{mean:+.4f} ± {se:.4f} ({mean / se:+.1f} s.e.)"
    )
    print(line)
    with open(Path(str(shapes_task["folder"])) / "learning.txt", "a", encoding="utf-8") as f:
        f.write(line + "\n")
    assert mean > GAIN_IN_SE * se, line
