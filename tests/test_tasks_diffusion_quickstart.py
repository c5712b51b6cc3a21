"""The diffusion quickstart: the shapes task's reward, and the pipeline end to end at toy sizes."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from preftune.tasks.shapes import BEST_REWARD, ShapePrompt, all_prompts, place_accuracy, render, reward

pytestmark = pytest.mark.usefixtures("one_thread")


def test_reward_of_renders_black_and_misplaced_squares() -> None:
    rng = np.random.default_rng(0)
    prompts = all_prompts()
    images = torch.from_numpy(np.stack([render(p, rng) for p in prompts]))
    assert torch.allclose(reward(images, prompts), torch.full((16,), BEST_REWARD))  # 36/64 = 0.5625
    black = -torch.ones(1, 3, 16, 16)
    assert float(reward(black, [prompts[0]])[0]) == 0.0
    red_tl = ShapePrompt("red", "top left")
    moved = torch.from_numpy(render(ShapePrompt("red", "bottom right"), rng))[None]
    assert float(reward(moved, [red_tl])[0]) == pytest.approx(-36 / 192)  # colour right, place wrong
    blue = torch.from_numpy(render(ShapePrompt("blue", "top left"), rng))[None]
    assert float(reward(blue, [red_tl])[0]) == 0.0  # place right, colour wrong (distance 2√2 > 2)
    assert place_accuracy(images, prompts).tolist() == [1.0] * 16
    assert float(place_accuracy(moved, [red_tl])[0]) == 0.0
    assert float(place_accuracy(black, [red_tl])[0]) == 0.0  # all quadrants tie: a miss
    assert float(place_accuracy(blue, [red_tl])[0]) == 0.0  # no red anywhere: a miss


def test_quickstart_pipeline_at_toy_size(tmp_path: Path) -> None:
    """Every stage runs and writes what it promises: pairs as image data, both grids (one row per
    prompt), summary.json with the paired gain and its standard error, report.html with the grids."""
    from preftune.tasks.diffusion_quickstart import DiffusionQuickstartConfig, run_diffusion_quickstart
    from preftune.tasks.shapes_model import PretrainConfig

    cfg = DiffusionQuickstartConfig(
        pretrain=PretrainConfig(vae_steps=2, unet_steps=2, batch_size=4, target_place=None), samples_per_prompt=2,
        pairs_per_prompt=1, min_gap=-1.0, heldout_seeds=2, sample_steps=2, max_steps=1, batch_size=4,
    )  # fmt: skip
    summary = run_diffusion_quickstart(tmp_path / "qs", config=cfg, log=lambda _: None, progress=False)
    out = tmp_path / "qs"
    rows = [json.loads(line) for line in (out / "data" / "pairs.jsonl").read_text().splitlines()]
    assert len(rows) == 16 and {r["prompt"] for r in rows} == {p.text for p in all_prompts()}
    assert summary["heldout_samples"] == 32 and summary["pairs"] == 16 and summary["steps"] == 1
    gain = summary["reward_after"] - summary["reward_before"]
    assert summary["reward_gain"] == pytest.approx(gain, abs=1e-6)
    from PIL import Image

    grid = Image.open(out / "samples_after.png")
    assert grid.size == (2 + 2 * (64 + 2), 2 + 16 * (64 + 2))  # 2 seeds × 16 prompts, 4× enlarged
    html = (out / "report.html").read_text()
    assert html.count('src="data:image/png;base64,') >= 2 and "samples before" in html


@pytest.mark.slow
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quickstart_raises_heldout_reward_by_3_standard_errors(tmp_path: Path, seed: int) -> None:
    """The target: held-out mean reward rises by more than 3 standard errors of the paired gain, and the
    pretrained model already puts the named colour in the named place more often than chance (a random
    quadrant scores 0 on average, a true image 36/64). Measured (docs/diffusion.md, "Quickstart"): seeds
    0, 1, 2 gain 14.6, 5.0 and 3.5 standard errors (seed 2 after its failed place check)."""
    from preftune.tasks.diffusion_quickstart import run_diffusion_quickstart

    summary = run_diffusion_quickstart(tmp_path / "qs", seed=seed, log=print, progress=False)
    assert summary["reward_gain"] > 3 * summary["reward_gain_se"] > 0
    assert 0.05 < summary["reward_before"] < summary["reward_after"] <= BEST_REWARD


def test_diffusion_sweep_scores_each_method_by_heldout_reward(tmp_path: Path) -> None:
    """`sweep --task diffusion` at toy size: the task is prepared once (reused for the same recipe,
    refused for another), every method trains on the same pairs, and the report shows the held-out
    mean reward as a number against the pretrained model's, not as an accuracy in %."""
    from preftune.config import TrainConfig
    from preftune.errors import ConfigError
    from preftune.eval.sweep import read_sweep, run_sweep
    from preftune.tasks.diffusion_quickstart import DiffusionQuickstartConfig
    from preftune.tasks.diffusion_sweep import diffusion_sweep_task
    from preftune.tasks.shapes_model import PretrainConfig

    cfg = DiffusionQuickstartConfig(
        pretrain=PretrainConfig(vae_steps=2, unet_steps=2, batch_size=4, target_place=None), samples_per_prompt=2,
        pairs_per_prompt=1, min_gap=-1.0, heldout_seeds=1, sample_steps=2, max_steps=1, batch_size=4,
    )  # fmt: skip
    quiet = lambda _: None  # noqa: E731
    values, task = diffusion_sweep_task(tmp_path / "task", seed=0, config=cfg, log=quiet)
    again, _ = diffusion_sweep_task(tmp_path / "task", seed=0, config=cfg, log=quiet)
    assert again == values and task.metric == "mean reward" and -1.0 <= task.baseline_accuracy <= 1.0
    # another training schedule reuses the prepared folder (the pretraining and the pairs do not depend on it)
    longer, _ = diffusion_sweep_task(
        tmp_path / "task", seed=0, config=replace(cfg, max_steps=3, lr=1e-4), log=quiet
    )
    assert longer == {**values, "max_steps": 3, "lr": 1e-4}
    with pytest.raises(ConfigError, match="another seed or recipe"):
        diffusion_sweep_task(tmp_path / "task", seed=1, config=cfg, log=quiet)
    # the pairs carry SmPO's scores: each image's reward over the std of all the pairs' rewards
    rows = [json.loads(line) for line in Path(values["data"]).read_text().splitlines()]
    scores = torch.tensor([[r["chosen_score"], r["rejected_score"]] for r in rows])
    assert len(rows) == 16 and abs(float(scores.flatten().std()) - 1.0) < 1e-5
    base = TrainConfig(**values, method="dpo", out=str(tmp_path / "sweep"), progress=False)
    score = task.accuracy
    assert score is not None
    result = run_sweep(
        ["dpo", "mapo", "smpo"], base, tmp_path / "sweep", task=task,
        evaluate_fn=lambda final, _: (score(final), None), log=quiet,
    )  # fmt: skip
    assert [r.status for r in result.results] == ["ok", "ok", "ok"]
    assert all(r.steps == 1 and -1.0 <= (r.accuracy or 2.0) <= 1.0 for r in result.results)
    assert read_sweep(tmp_path / "sweep").task_metric == "mean reward"
    html = (tmp_path / "sweep" / "sweep.html").read_text()
    assert "task mean reward" in html and f"{task.baseline_accuracy:.4f}" in html
    # the scores are drawn as their change from the pretrained model's, not as bars from 0
    assert f"mean reward: change from the reference model ({task.baseline_accuracy:.4f})" in html


def test_two_caption_pairs_caption_the_loser_by_what_it_shows(tmp_path: Path) -> None:
    """DCPO's rows for the task: the winner keeps its prompt; the loser is captioned by the other prompt
    its image matches best — a blue square at the bottom right is "blue square bottom right" even
    under the prompt "red square top left"; a loser that shows its own prompt gets the nearest other
    caption, never its own."""
    from preftune.tasks.diffusion_sweep import scored_pairs, two_caption_pairs
    from preftune.tasks.shapes import parse_prompt, to_png

    rng = np.random.default_rng(0)
    (tmp_path / "img").mkdir()
    for n, text in enumerate(("red square top left", "blue square bottom right")):
        image = torch.from_numpy(render(parse_prompt(text), rng))
        (tmp_path / "img" / f"{n}.png").write_bytes(to_png(image))
    rows = [
        {"prompt": "red square top left", "chosen": "img/0.png", "rejected": "img/1.png"},
        {"prompt": "red square top left", "chosen": "img/0.png", "rejected": "img/0.png"},
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = [json.loads(line) for line in two_caption_pairs(scored_pairs(data)).read_text().splitlines()]
    assert [(r["chosen_prompt"], r["chosen"], r["rejected"]) for r in out] == [
        ("red square top left", "img/0.png", "img/1.png"),
        ("red square top left", "img/0.png", "img/0.png"),
    ]
    assert out[0]["rejected_prompt"] == "blue square bottom right"
    # a red square top left under another prompt: red elsewhere scores below 0 (the red pixels lie
    # outside the named place); green, blue or yellow anywhere exactly 0 (red and black pixels are
    # ≥ 2 from those colours, closeness 0) — the first of the ties in prompt order is green top left
    assert out[1]["rejected_prompt"] == "green square top left"
    assert "chosen_score" in out[0] and "prompt" not in out[0]


def test_a_failed_place_check_trains_the_denoiser_again_as_a_longer_pretraining_would(tmp_path: Path) -> None:
    """Below `target_place` the UNet and text encoder are trained again from their start for
    `max_unet_steps`: the saved pipeline equals the one `unet_steps=max_unet_steps` gives directly, to
    the bit; above it, or with the check off, the first training is kept."""
    from safetensors.torch import load_file

    from preftune.tasks.shapes_model import PretrainConfig, pretrain

    small = {"vae_steps": 2, "batch_size": 4, "check_seeds": 1}
    logs: list[str] = []
    pretrain(tmp_path / "again", seed=3, config=PretrainConfig(**small, unet_steps=2, max_unet_steps=4,
             target_place=1.0), log=logs.append)  # fmt: skip
    assert any("training the denoiser again from its start with 4 steps" in line for line in logs), logs
    pretrain(
        tmp_path / "direct",
        seed=3,
        config=PretrainConfig(**small, unet_steps=4, target_place=None),
        log=print,
    )
    pretrain(
        tmp_path / "kept", seed=3, config=PretrainConfig(**small, unet_steps=2, target_place=0.0), log=print
    )
    pretrain(
        tmp_path / "short", seed=3, config=PretrainConfig(**small, unet_steps=2, target_place=None), log=print
    )

    def weights(name: str, part: str) -> dict[str, torch.Tensor]:
        return load_file(str(next((tmp_path / name / part).glob("*.safetensors"))))

    for part in ("unet", "text_encoder", "vae"):
        again, direct = weights("again", part), weights("direct", part)
        assert again.keys() == direct.keys() and all(torch.equal(again[k], direct[k]) for k in again)
        kept, short = weights("kept", part), weights("short", part)
        assert all(torch.equal(kept[k], short[k]) for k in kept)
    unet_again, unet_short = weights("again", "unet"), weights("short", "unet")
    assert not all(torch.equal(unet_again[k], unet_short[k]) for k in unet_again)  # 4 steps are not 2


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--method", "grpo"], "trains an offline loss on image pairs"),
        (
            ["--method", "dpok"],
            "the online diffusion methods (ddpo, dpok, d3po, spo, awm) run with preftune train",
        ),
        (["--method", "dpp"], "unknown loss 'dpp' — did you mean 'dpo'?"),
        (["--method", "kto"], "'kto' cannot train a diffusion pipeline: its reference point z₀"),
        (["--method", "kto"], "— use diff_kto, its diffusion form"),
        (["--method", "dpo:1,kto:1"], "use diff_kto, its diffusion form"),
        (["--method", "ld_dpo"], "it reads per-token log-probs"),
        (["--method", "tpo"], "it trains on ranked lists of responses"),
        (["--method", "sft"], "alone it has no image data layout"),
        (["--method", "smpo"], "run it with preftune sweep --task diffusion --methods smpo"),
        (["--method", "smooth_dpo"], "the quickstart's pairs do not carry"),
        (["--method", "grpo"], "use ddpo, its diffusion counterpart"),
        (["--level", "3", "--sft-steps", "9"], "--level, --sft-steps belong to the arithmetic task"),
    ],
)
def test_diffusion_quickstart_refuses_what_it_cannot_run_before_pretraining(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], args: list[str], expected: str
) -> None:
    from preftune.cli import main

    assert main(["quickstart", "--task", "diffusion", "--out", str(tmp_path / "qs"), *args]) == 2
    assert expected in capsys.readouterr().err
    assert not (tmp_path / "qs").exists()  # nothing pretrained


def test_an_unknown_diffusion_quickstart_method_is_matched_against_its_own_losses_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The suggestion and the list are the losses the diffusion quickstart runs (they listed every
    loss, kto and the listwise ones included, which then failed after minutes of pretraining)."""
    from preftune.cli import main
    from preftune.tasks.diffusion_quickstart import quickstart_losses

    assert main(["quickstart", "--task", "diffusion", "--out", str(tmp_path / "qs"), "--method", "kt"]) == 2
    said = capsys.readouterr().err
    assert "unknown loss 'kt'" in said and "did you mean 'kto'" not in said, said
    listed = said.split("trains one of: ")[1].split(";")[0].split(", ")
    assert listed == quickstart_losses()
    assert "diff_kto" in listed and "dpo" in listed
    for language_only in ("kto", "ld_dpo", "listwise_pl", "tpo", "sft", "smpo", "smooth_dpo"):
        assert language_only not in listed
    assert not (tmp_path / "qs").exists()


def _no_preparation(*_args: object, **_kw: object) -> None:
    raise AssertionError("the task was prepared before the methods were checked")


def test_diffusion_sweep_refuses_every_method_that_cannot_train_a_pipeline_before_preparing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """sweep --task diffusion ran kto, the listwise losses, sft alone and the online language presets
    only to fail each at its run's start, after minutes of pretraining; all are named at once, each
    with the single-run refusal's reason and fix, before the task folder is made."""
    from preftune.cli import main

    monkeypatch.setattr("preftune.tasks.diffusion_sweep.diffusion_sweep_task", _no_preparation)

    out = tmp_path / "sweep"
    assert main(["sweep", "--task", "diffusion", "--methods", "dpo,kto,tpo,sft,grpo", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sweep: 4 of --methods cannot train the diffusion task's pipeline (nothing was prepared)" in err
    assert "loss 'kto' cannot train a diffusion pipeline: its reference point z₀" in err
    assert "— use diff_kto, its diffusion form" in err
    assert "loss 'tpo' cannot train a diffusion pipeline: it trains on ranked lists of responses" in err
    assert "loss 'sft' cannot train a diffusion pipeline: alone it has no image data layout" in err
    assert "'grpo' samples text from a language model — use ddpo, its diffusion counterpart" in err
    assert "the losses that train a pipeline: alphapo," in err and "'dpo'" not in err
    assert not out.exists()  # nothing prepared

    assert main(["sweep", "--task", "diffusion", "--methods", "dpo,kt", "--out", str(out)]) == 2
    err = capsys.readouterr().err  # matched against the losses that train a pipeline, not every family
    assert "sweep --task diffusion: unknown loss 'kt' (it trains one of: alphapo, aot," in err
    assert "'kto'" not in err and ", kto," not in err  # (every family's list suggested kto)
    assert not out.exists()


def test_a_language_sweep_refuses_diffusion_losses_before_preparing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The arithmetic task's sweep ran mapo and diff_kto only to fail each at its run's start, after
    the SFT model was trained; both are named up front with the way to run them."""
    from preftune.cli import main

    monkeypatch.setattr("preftune.eval.builtin.builtin_task", _no_preparation)

    out = tmp_path / "sweep"
    assert main(["sweep", "--methods", "dpo,mapo,diff_kto", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "sweep: 2 of --methods cannot train a language model (nothing was prepared)" in err
    assert "'mapo' is a diffusion loss (docs/diffusion.md): it trains a diffusers pipeline folder — " in err
    assert "sweep it with --task diffusion; for a language model use dpo, kto, simpo" in err
    assert (
        "'diff_kto' is a diffusion loss" in err and "for a language model use kto, its language form" in err
    )
    assert not out.exists()
