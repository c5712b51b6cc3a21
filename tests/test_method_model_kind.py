"""A method meets the model it fits: diffusion-only losses refuse a language model, language-model
methods (online presets, distillation, reward models) refuse a diffusers pipeline folder, and image
preference data refuses a language model — each before anything trains, with the fix. They used to
train silently (inpo on a language model at β 2000, dpo on image file names as text) or fail with
another subsystem's error ("folder is not a saved datasets dataset", "cannot load a tokenizer")."""

from __future__ import annotations

from pathlib import Path

import pytest

from preftune.cli import main
from preftune.losses import REGISTRY
from preftune.method_checks import DIFFUSION_LOSSES
from test_train_fixtures import pair_rows, tiny_model, write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")


def test_the_diffusion_only_losses_are_those_of_the_diffusion_module() -> None:
    from_module = {n for n, s in REGISTRY.items() if s.fn.__module__ == "preftune.losses.diffusion_losses"}
    assert set(DIFFUSION_LOSSES) == from_module


@pytest.fixture(scope="module")
def folders(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from PIL import Image

    from preftune.diffusion.tiny import save_tiny_pipeline

    root = tmp_path_factory.mktemp("kinds")
    for name in ("a", "b"):
        Image.new("RGB", (16, 16), (200, 10, 10) if name == "a" else (10, 10, 200)).save(root / f"{name}.png")
    images = [{"prompt": "red", "chosen": str(root / "a.png"), "rejected": str(root / "b.png")}] * 4
    return {
        "lm": tiny_model(root / "lm"),
        "pipe": save_tiny_pipeline(root / "pipe"),
        "pairs": write_jsonl(root / "pairs.jsonl", pair_rows(4)),
        "images": write_jsonl(root / "images.jsonl", images),
        "prompts": write_jsonl(root / "prompts.jsonl", [{"prompt": "1+2="}] * 4),
    }


def _refused(args: list[str], out: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main([*args, "--out", str(out), "--max-steps", "1", "--batch-size", "2", "--no-progress"]) != 0
    assert not (out / "checkpoints").exists() and not (out / "final").exists()
    return capsys.readouterr().err


@pytest.mark.parametrize("loss", DIFFUSION_LOSSES)
def test_a_diffusion_loss_refuses_a_language_model(
    folders: dict[str, Path], loss: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    said = _refused(
        ["train", loss, "--model", str(folders["lm"]), "--data", str(folders["pairs"])],
        tmp_path / "o",
        capsys,
    )
    assert f"'{loss}' is a diffusion loss" in said and "must be a diffusers pipeline folder" in said


@pytest.mark.parametrize(
    "args, expected",
    [
        (
            ["train", "grpo", "--prompts", "{prompts}", "--reward", "arithmetic"],
            "samples text from a language model",
        ),
        (["train", "dckd", "--teacher", "{pipe}", "--data", "{pairs}"], "distils a language model"),
        (["train", "rm", "--data", "{pairs}"], "train rm / prm train a language model into a reward model"),
    ],
)
def test_language_model_methods_refuse_a_pipeline_folder(
    folders: dict[str, Path],
    args: list[str],
    expected: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    filled = [a.format(**{k: str(v) for k, v in folders.items()}) for a in args]
    said = _refused([*filled, "--model", str(folders["pipe"])], tmp_path / "o", capsys)
    assert expected in said and "pipeline folder" in said, said


@pytest.mark.parametrize(
    "method, expected",
    [
        ("kto", "its reference point z₀ scores completions of other prompts under each prompt, which a "
         "denoiser's per-image statistic does not give — use diff_kto, its diffusion form"),
        ("kto:1,sft:0.1", "loss 'kto' cannot train a diffusion pipeline"),
        ("ld_dpo", "it reads per-token log-probs, and a denoiser gives one statistic per image — use one of: "),
        ("listwise_pl", "it trains on ranked lists of responses"),
        ("sft", "alone it has no image data layout; on a pipeline folder it is a term beside a pairwise"),
    ],
)  # fmt: skip
def test_a_language_only_loss_on_a_pipeline_folder_names_the_diffusion_loss_to_use(
    folders: dict[str, Path], method: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Refused before the run folder is made (kto used to fail at its first step with "needs branch 1
    = a completion of a different prompt", naming no diffusion loss)."""
    said = _refused(
        ["train", method, "--model", str(folders["pipe"]), "--data", str(folders["images"])],
        tmp_path / "o",
        capsys,
    )
    assert "--model " + str(folders["pipe"]) + " is a diffusers pipeline folder" in said
    assert expected in said, said
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("method, counterpart", [("grpo", "ddpo"), ("ppo", "dpok"), ("online_dpo", "d3po")])
def test_an_online_language_method_on_a_pipeline_folder_names_its_diffusion_counterpart(
    folders: dict[str, Path],
    method: str,
    counterpart: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    args = ["train", method, "--prompts", str(folders["prompts"]), "--reward", "arithmetic"]
    said = _refused([*args, "--model", str(folders["pipe"])], tmp_path / "o", capsys)
    assert f"use {counterpart}, its diffusion counterpart (" in said, said


def test_image_losses_are_those_that_train_a_pipeline_folder(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`image_losses` (what the refusals and the diffusion quickstart list) is what trains: each
    takes a step on scored image pairs, and every other loss is refused before the run folder."""
    from preftune.method_checks import image_losses

    root = folders["images"].parent
    rows = [{"prompt": "red", "chosen": str(root / "a.png"), "rejected": str(root / "b.png"),
             "chosen_score": 1.0, "rejected_score": 0.0}] * 4  # fmt: skip
    scored = write_jsonl(tmp_path / "scored.jsonl", rows)
    trains = image_losses()
    assert {"dpo", "diff_kto", "mapo", "smpo", "inpo", "bco_unpaired"} <= set(trains)
    for name in sorted(REGISTRY):
        out = tmp_path / name
        args = ["train", name, "--model", str(folders["pipe"]), "--data", str(scored), "--out", str(out)]
        code = main([*args, "--max-steps", "1", "--batch-size", "2", "--no-progress",
                     "--cache-dir", str(tmp_path / "cache")])  # fmt: skip
        said = capsys.readouterr().err
        if name in trains:
            assert code == 0 and (out / "final").is_dir(), (name, said)
        else:
            assert code == 2 and f"loss '{name}' cannot train a diffusion pipeline" in said, (name, said)
            assert not out.exists()


def test_image_pairs_refuse_a_language_model(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    said = _refused(
        ["train", "dpo", "--model", str(folders["lm"]), "--data", str(folders["images"])],
        tmp_path / "o",
        capsys,
    )
    assert "images.jsonl:1: holds image preference data" in said and "diffusers pipeline folder" in said


def test_a_damaged_or_missing_pipeline_weights_file_is_named_not_a_traceback(
    folders: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import shutil

    damaged, missing = tmp_path / "damaged", tmp_path / "missing"
    shutil.copytree(folders["pipe"], damaged)
    shutil.copytree(folders["pipe"], missing)
    (damaged / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"not a safetensors file")
    (missing / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    said = _refused(
        ["train", "dpo", "--model", str(damaged), "--data", str(folders["images"])], tmp_path / "a", capsys
    )
    assert f"{damaged / 'unet'}: cannot load the pipeline's unet" in said and "save_pretrained" in said, said
    said = _refused(
        ["train", "dpo", "--model", str(missing), "--data", str(folders["images"])], tmp_path / "b", capsys
    )
    assert f"{missing / 'vae'}: cannot load the pipeline's vae" in said and "Traceback" not in said, said
    args = ["train", "dpo", "--model", str(folders["pipe"]), "--data", str(folders["images"]), "--lora"]
    said = _refused([*args, "--lora-target-modules", "nosuch_proj"], tmp_path / "c", capsys)
    assert "do not fit the pipeline's unet" in said and "to_q" in said, said
