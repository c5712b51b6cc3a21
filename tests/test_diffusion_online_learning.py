"""Slow: each online diffusion method, run as `preftune train METHOD` runs it, raises the held-out mean
reward of the built-in task's pretrained pipeline by more than 3 standard errors of the paired gain.

One pipeline is pretrained for the module (`shapes_model.pretrain`, the quickstart's defaults, about
90 s of CPU); every method then trains 30 steps of 8 prompts × 4 samples (10 DDIM η = 1 steps) at
lr 3e-5 and is scored on 16 prompts × 8 held-out seeds with its own sampler, before and after, from
the same noise (`online_run.train_online_diffusion`, the function the CLI calls).

AWM trains flow-matching pipelines: its test pretrains the same task with the rectified-flow loss
(`PretrainConfig(prediction_type="flow")`) and samples with the flow ODE. DDPO and D3PO run on that
flow pipeline too, sampling with Flow-GRPO's SDE (`flow_policy.FlowSDEPolicy`).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("diffusers")

from preftune.config import load_config  # noqa: E402
from preftune.diffusion.online_run import train_online_diffusion  # noqa: E402
from preftune.tasks.shapes import all_prompts  # noqa: E402
from preftune.tasks.shapes_model import PretrainConfig, pretrain  # noqa: E402

# pretraining (~90 CPU-s) and each run (~60-90 CPU-s): over the 600 s default on loaded cores
pytestmark = [pytest.mark.slow, pytest.mark.timeout(0), pytest.mark.usefixtures("one_thread")]


def _task(root: Path, kind: str) -> Path:
    pretrain(root / "pipe", seed=0, config=PretrainConfig(prediction_type=kind), log=lambda _m: None)
    rows = [{"prompt": p.text} for p in all_prompts()]
    (root / "prompts.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


@pytest.fixture(scope="module")
def task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _task(tmp_path_factory.mktemp("shapes-online"), "v_prediction")


@pytest.fixture(scope="module")
def flow_task(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _task(tmp_path_factory.mktemp("shapes-flow"), "flow")


# the paper defaults of each method but where the built-in task needs otherwise (docs/diffusion.md):
# SPO scores candidates by the reward of the decoded x̂_0 (its paper's step-aware critic, a tiny
# network here, ranks this task's candidates no better than chance) and keeps every step pair
METHODS = {"ddpo": {}, "dpok": {}, "d3po": {}, "spo": {"scorer": "x0", "threshold": 0.0}}


@pytest.mark.parametrize("method", list(METHODS))
def test_online_method_raises_the_heldout_reward_of_the_built_in_task(task, method):
    _check_learns(task, method)


def test_awm_raises_the_heldout_reward_of_the_built_in_task_trained_as_a_flow(flow_task):
    _check_learns(flow_task, "awm")


@pytest.mark.parametrize("method", ["ddpo", "d3po"])
def test_sde_sampled_method_raises_the_heldout_reward_of_the_task_trained_as_a_flow(flow_task, method):
    """DDPO and D3PO on the flow-matching pipeline: the policy is Flow-GRPO's SDE sampler (noise level
    0.7), held-out samples are drawn with it from fixed noise before and after."""
    _check_learns(flow_task, method)


def _check_learns(task: Path, method: str) -> None:
    config = load_config(
        None,
        {"method": method, "model": str(task / "pipe"), "prompts": str(task / "prompts.jsonl"),
         "reward": "shapes", "out": str(task / f"run-{method}"), "max_steps": 30, "batch_size": 8,
         "num_generations": 4, "lr": 3e-5, "scheduler": "constant", "progress": False, "report": False,
         "log_every": 10, "hparams": {"heldout": 8, **METHODS.get(method, {})}},
    )  # fmt: skip
    result = train_online_diffusion(config)
    e = {k[5:]: v for k, v in result.metrics.items() if k.startswith("eval/")}
    assert e["heldout_samples"] == 128.0
    assert e["reward_gain"] > 3 * e["reward_gain_se"] > 0, e
    assert e["reward"] > e["reward_before"] > 0.05, e  # a model that learnt the task, and improved
    summary = json.loads((task / f"run-{method}" / "summary.json").read_text())
    assert summary["eval"]["reward_gain"] == pytest.approx(e["reward_gain"])
