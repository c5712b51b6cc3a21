"""`preftune train` on a diffusers pipeline folder: the trainer's loss is the official Diffusion-DPO
expression, LoRA checkpoints resume exactly, final/ is a loadable pipeline."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from preftune.cli import main
from preftune.config import TrainConfig
from preftune.diffusion.phase import noise_seed
from preftune.diffusion.tiny import save_tiny_pipeline, write_image_pairs
from preftune.train.api import train

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("diffusion")
    pipe = save_tiny_pipeline(root / "pipe")
    data = write_image_pairs(root / "data", pairs=4)
    return root, pipe, data


def config(root: Path, pipe: Path, data: Path, out: str, **kw: object) -> TrainConfig:
    base: dict[str, object] = dict(
        method="dpo",
        model=str(pipe),
        data=str(data),
        out=str(root / out),
        batch_size=2,
        max_steps=2,
        lr=1e-3,
        scheduler="constant",
        warmup_ratio=0.0,
        cache_dir=str(root / "cache"),
        progress=False,
    )
    base.update(kw)
    return TrainConfig(**base)  # type: ignore[arg-type]


def test_eval_loss_is_the_official_diffusion_dpo_expression(setup: tuple[Path, Path, Path]) -> None:
    """The run's held-out loss equals −log σ(−β/2 · d) computed by hand from the trained and initial
    UNets with each held-out pair's own ε and t (β = 5000, the paper's default)."""
    from diffusers import DDPMScheduler, UNet2DConditionModel

    from preftune.diffusion.denoiser import example_noise
    from preftune.diffusion.encode import load_encoders, vae_latents
    from preftune.diffusion.encode import pixels as to_pixels
    from preftune.diffusion.tiny import encode_prompts
    from preftune.types import Example

    root, pipe, data = setup
    result = train(config(root, pipe, data, "dpo", eval_data=str(data), seed=3))
    trained = UNet2DConditionModel.from_pretrained(str(result.final_dir), subfolder="unet")
    initial = UNet2DConditionModel.from_pretrained(str(pipe), subfolder="unet")
    scheduler = DDPMScheduler.from_pretrained(str(pipe), subfolder="scheduler")
    vae, tokenizer, text_encoder = load_encoders(pipe)
    losses = []
    for i, line in enumerate(data.read_text().splitlines()):
        row = json.loads(line)
        images = torch.stack(
            [
                to_pixels((data.parent / row[k]).read_bytes(), 16, where=lambda: ("", 0, ""))
                for k in ("chosen", "rejected")
            ]
        )
        latents = vae_latents(vae, images)
        text = encode_prompts(tokenizer, text_encoder, [row["prompt"]]).repeat(2, 1, 1)
        noise, t = example_noise(
            Example([], [], meta={"noise_seed": noise_seed(3, "eval", i)}), latents[0].shape, 1000
        )
        noisy = scheduler.add_noise(latents, noise.repeat(2, 1, 1, 1), t.repeat(2))
        with torch.no_grad():
            mse = [
                ((m(noisy, t.repeat(2), encoder_hidden_states=text).sample - noise) ** 2).mean(dim=(1, 2, 3))
                for m in (trained, initial)
            ]
        d = (mse[0][0] - mse[1][0]) - (mse[0][1] - mse[1][1])
        losses.append(-torch.nn.functional.logsigmoid(-0.5 * 5000.0 * d))
    expected = float(torch.stack(losses).mean())
    assert result.metrics["eval/loss"] == pytest.approx(expected, rel=2e-3, abs=2e-4)
    assert abs(expected - 0.6931) > 1e-3  # the model moved: not the trivial log 2


def test_lora_run_resumes_exactly_and_final_is_a_pipeline(setup: tuple[Path, Path, Path]) -> None:
    """2 steps, then --resume to 4 (constant lr), equals 4 steps at once: same adapter weights;
    checkpoints hold only the adapter; final/ loads as a StableDiffusionPipeline."""
    from diffusers import StableDiffusionPipeline

    root, pipe, data = setup
    lora = dict(lora=True, lora_r=4)
    whole = train(config(root, pipe, data, "whole", max_steps=4, **lora))
    train(config(root, pipe, data, "parts", max_steps=2, **lora))
    parts = train(config(root, pipe, data, "parts", max_steps=4, resume="latest", **lora))
    a = load_file(str(whole.out_dir / "checkpoints" / "step-4" / "adapter_model.safetensors"))
    b = load_file(str(parts.out_dir / "checkpoints" / "step-4" / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all("lora_" in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not (whole.out_dir / "checkpoints" / "step-4" / "model.safetensors").exists()
    rows = [json.loads(line) for line in (whole.out_dir / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["split"] == "train"]
    for r in train_rows:  # an image run counts images (two per pair), not tokens
        assert "tokens_per_s" not in r and r["images_per_s"] == pytest.approx(2 * r["examples_per_s"])
    loaded = StableDiffusionPipeline.from_pretrained(str(whole.final_dir), safety_checker=None)
    assert (whole.final_dir / "adapter" / "adapter_config.json").is_file()
    image = loaded("shape 0", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16)


def test_cache_is_reused_and_cache_reference_refused(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, pipe, data = setup
    code = main(["train", "dpo", "--model", str(pipe), "--data", str(data), "--out", str(root / "c1"),
                 "--max-steps", "1", "--batch-size", "2", "--cache-dir", str(root / "cache2")])  # fmt: skip
    assert code == 0 and "encoded 8 images and 4 captions" in capsys.readouterr().out
    code = main(["train", "dpo", "--model", str(pipe), "--data", str(data), "--out", str(root / "c2"),
                 "--max-steps", "1", "--batch-size", "2", "--cache-dir", str(root / "cache2")])  # fmt: skip
    assert code == 0 and "8 latents and 4 text embeddings from the cache" in capsys.readouterr().out
    cached = next((root / "cache2" / "diffusion").glob("*.safetensors"))
    cached.write_bytes(cached.read_bytes()[:100])  # a damaged entry is recomputed, never trusted
    code = main(["train", "dpo", "--model", str(pipe), "--data", str(data), "--out", str(root / "c4"),
                 "--max-steps", "1", "--batch-size", "2", "--cache-dir", str(root / "cache2")])  # fmt: skip
    assert code == 0 and "encoded 8 images and 4 captions" in capsys.readouterr().out
    code = main(["train", "dpo", "--model", str(pipe), "--data", str(data), "--out", str(root / "c3"),
                 "--reference", "cache"])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "reference=cache stores fixed log-probs" in err


def test_diffusion_beta_default_and_kto_on_pairs(setup: tuple[Path, Path, Path]) -> None:
    """On a pipeline folder dpo's β defaults to the paper's 5000 (config.yaml records it; --beta
    still wins); diff_kto splits each of the 4 pairs into a liked and a disliked image."""
    import yaml

    root, pipe, data = setup
    result = train(config(root, pipe, data, "beta", max_steps=1))
    assert yaml.safe_load((result.out_dir / "config.yaml").read_text())["hparams"] == {
        "beta": 5000.0,
        "wpo_weighting": False,
    }
    result = train(config(root, pipe, data, "beta2", max_steps=1, hparams={"beta": 2500.0}))
    assert yaml.safe_load((result.out_dir / "config.yaml").read_text())["hparams"] == {
        "beta": 2500.0,
        "wpo_weighting": False,
    }
    result = train(config(root, pipe, data, "kto", method="diff_kto", max_steps=1, batch_size=8))
    assert result.metrics["examples_per_s"] > 0
    first = json.loads((result.out_dir / "metrics.jsonl").read_text().splitlines()[0])
    assert first["loss"] == pytest.approx(0.5, abs=1e-6)  # policy = reference: g = z = 0, 1 − σ(0)


@pytest.mark.parametrize("method", ["dpo", "diff_kto"])  # diff_kto: each pair split into two images
def test_resume_refuses_an_image_rewritten_under_its_path(
    setup: tuple[Path, Path, Path], tmp_path: Path, method: str
) -> None:
    """The run's data digest covered the rows' count and labels, so an image file rewritten between
    stop and --resume trained silently on the new pixels; the checkpoint now records each row's image
    digests (the latent cache's SHA-256 keys), and the resume is refused naming the file and the row."""
    from PIL import Image

    from preftune.errors import TrainingError

    root, pipe, _ = setup
    data = write_image_pairs(tmp_path / "data", pairs=4, seed=5)
    train(config(root, pipe, data, f"rewritten-{method}", method=method, max_steps=2))
    again = train(
        config(root, pipe, data, f"rewritten-{method}", method=method, max_steps=3, resume="latest")
    )
    assert again.steps == 3  # the same images: resumed
    image = data.parent / "img" / "2-rejected.png"
    Image.fromarray(255 - np.asarray(Image.open(image))).save(image)  # same path, other pixels
    with pytest.raises(TrainingError) as err:
        train(config(root, pipe, data, f"rewritten-{method}", method=method, max_steps=4, resume="latest"))
    assert str(err.value).startswith(f"resume: data '{data}' row 3: its images or caption are not the ones")
    assert "an image file was rewritten under the same path" in str(err.value)
    assert f"checkpoint {root / f'rewritten-{method}' / 'checkpoints' / 'step-3'}" in str(err.value)
