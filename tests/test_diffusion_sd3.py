"""SD3-style (rectified-flow transformer) pipelines in `preftune train`: a tiny StableDiffusion3Pipeline
built from configs (nothing downloaded) trains from the CLI, its statistic is the rectified-flow mse
computed by hand, DPO starts at log 2, and a broken folder is a message, not a traceback."""

from __future__ import annotations

import json
import logging
import math
import shutil
from pathlib import Path

import pytest
import torch

pytest.importorskip("diffusers")

from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline  # noqa: E402

from preftune.cli import main  # noqa: E402
from preftune.diffusion.denoiser import (  # noqa: E402
    denoising_example_stats,
    load_denoiser,
    load_pipeline,
    training_scheduler,
)
from preftune.diffusion.encode import T5_TOKENS, caption_encoder, cut_captions_note  # noqa: E402
from preftune.diffusion.seam import draw_timesteps  # noqa: E402
from preftune.diffusion.tiny import save_tiny_sd3_pipeline, write_image_pairs  # noqa: E402
from preftune.types import Example  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    root = tmp_path_factory.mktemp("sd3")
    pipe = save_tiny_sd3_pipeline(root / "pipe")
    data = write_image_pairs(root / "data", pairs=4)
    return root, pipe, data


def _train(root: Path, pipe: Path, data: Path, method: str, out: str, *extra: str) -> int:
    argv = ["train", method, "--model", str(pipe), "--data", str(data), "--out", str(root / out),
            "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3", "--cache-dir", str(root / "cache"),
            "--no-progress", *extra]  # fmt: skip
    return main(argv)


def _generates(final: Path) -> None:
    loaded = StableDiffusion3Pipeline.from_pretrained(str(final), text_encoder_3=None, tokenizer_3=None)
    image = loaded("shape 0", num_inference_steps=2, height=16, width=16, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()


def test_tiny_sd3_folder_is_an_sd3_pipeline(setup: tuple[Path, Path, Path]) -> None:
    _, pipe, _ = setup
    index = json.loads((pipe / "model_index.json").read_text())
    assert index["transformer"] == ["diffusers", "SD3Transformer2DModel"]
    assert index["text_encoder_2"] == ["transformers", "CLIPTextModelWithProjection"]
    assert index["text_encoder_3"] == [None, None]
    vae = json.loads((pipe / "vae" / "config.json").read_text())
    assert (vae["shift_factor"], vae["scaling_factor"]) == (0.0609, 1.5305)  # SD3's VAE
    assert json.loads((pipe / "scheduler" / "scheduler_config.json").read_text())["shift"] == 3.0
    _generates(pipe)
    assert isinstance(load_pipeline(pipe), StableDiffusion3Pipeline)  # T5's null entries passed as None


def test_cli_trains_dpo_with_lora_and_mapo_then_final_loads(setup: tuple[Path, Path, Path]) -> None:
    """dpo (LoRA, adapters-off reference) starts at log 2 — policy = reference — and moves; mapo
    (reference-free, whole transformer) trains too; each final/ is a StableDiffusion3Pipeline whose
    transformer differs from the initial one."""
    root, pipe, data = setup
    assert _train(root, pipe, data, "dpo", "dpo", "--lora", "--lora-r", "4") == 0
    rows = [json.loads(line) for line in (root / "dpo" / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r.get("split") == "train"]
    assert train_rows[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert abs(train_rows[1]["loss"] - math.log(2)) > 1e-5  # the adapter moved the statistic
    adapter = json.loads((root / "dpo" / "final" / "adapter" / "adapter_config.json").read_text())
    assert {"to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "to_add_out"} <= set(adapter["target_modules"])
    assert _train(root, pipe, data, "mapo", "mapo") == 0
    initial = SD3Transformer2DModel.from_pretrained(str(pipe), subfolder="transformer").state_dict()
    for run in ("dpo", "mapo"):
        final = root / run / "final"
        trained = SD3Transformer2DModel.from_pretrained(str(final), subfolder="transformer").state_dict()
        assert trained.keys() == initial.keys()
        assert any(not torch.equal(trained[k], initial[k]) for k in initial)
        _generates(final)


def test_statistic_is_the_rectified_flow_mse_by_hand(setup: tuple[Path, Path, Path]) -> None:
    """−½·mse(v_θ(x_t, σ·1000, c), ε − x_0), x_t = (1 − σ) x_0 + σ ε, with ε and σ of the example's
    seed drawn by hand: n ~ N(0, 1), u = sigmoid(n), s = 1 − ⌊1000 u⌋/1000, σ = 3s / (1 + 2s) (SD3's
    shift 3); both images of the pair share ε and σ; c straight from encode_prompt."""
    _, pipe, _ = setup
    model = load_denoiser(pipe)
    x0 = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    packed = caption_encoder(pipe)(["shape 1"])[0]
    example = Example([], [[0], [0]], meta={"latents": list(x0), "text": [packed], "noise_seed": 1234})
    with torch.no_grad():
        logps = denoising_example_stats(model, [example]).logps
    g = torch.Generator().manual_seed(1234)
    eps = torch.randn(4, 8, 8, generator=g)
    u = torch.sigmoid(torch.normal(0.0, 1.0, (1,), generator=g))
    s = 1.0 - math.floor(float(u) * 1000) / 1000
    sigma = 3 * s / (1 + 2 * s)
    reader = StableDiffusion3Pipeline.from_pretrained(str(pipe), text_encoder_3=None, tokenizer_3=None)
    with torch.no_grad():
        embeds, _, pooled, _ = reader.encode_prompt("shape 1", None, None, do_classifier_free_guidance=False)
        x_t = (1 - sigma) * x0 + sigma * eps
        v = model(
            hidden_states=x_t,
            timestep=torch.full((2,), sigma * 1000),
            encoder_hidden_states=embeds.repeat(2, 1, 1),
            pooled_projections=pooled.repeat(2, 1),
        ).sample
    by_hand = -0.5 * ((v - (eps - x0)) ** 2).mean(dim=(1, 2, 3))
    torch.testing.assert_close(logps, by_hand, rtol=1e-5, atol=1e-6)


def test_flow_sampler_on_packed_conditioning_is_the_sd3_pipeline(setup: tuple[Path, Path, Path]) -> None:
    """awm.sample_flow (the default call, `denoiser_output`) on the cached, packed conditioning
    reproduces StableDiffusion3Pipeline's own latents from the same noise (no guidance, 3 steps)."""
    from preftune.diffusion.awm import sample_flow

    _, pipe, _ = setup
    reader = StableDiffusion3Pipeline.from_pretrained(str(pipe), text_encoder_3=None, tokenizer_3=None)
    reader.set_progress_bar_config(disable=True)
    noise = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    cond = caption_encoder(pipe)(["shape 0", "shape 1"])
    with torch.no_grad():
        ours = sample_flow(reader.transformer, training_scheduler(pipe), cond, noise, 3)
        theirs = reader(["shape 0", "shape 1"], num_inference_steps=3, height=16, width=16, guidance_scale=1.0,
                        latents=noise, output_type="latent").images  # fmt: skip
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


def test_flow_timesteps_are_sd3_logit_normal(setup: tuple[Path, Path, Path]) -> None:
    """Unshifted, the drawn σ are logit-normal(0, 1): logit(s) has mean 0 and std 1 (20000 draws;
    standard error of the mean 0.007); every t is a point of the scheduler's shifted training grid."""
    _, pipe, _ = setup
    scheduler = training_scheduler(pipe)
    t = draw_timesteps(scheduler, 20000, torch.Generator().manual_seed(0))
    sigma = t.double() / 1000
    s = sigma / (3 - 2 * sigma)  # σ = 3s / (1 + 2s) inverted
    logit = torch.log(s / (1 - s).clamp_min(1e-12))
    assert abs(float(logit.mean())) < 0.03 and abs(float(logit.std()) - 1) < 0.03
    assert torch.isin(t, scheduler.timesteps).all()


def test_broken_sd3_folder_and_inversion_are_refused(
    setup: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    root, pipe, data = setup
    broken = root / "broken"
    shutil.copytree(pipe, broken)
    (broken / "transformer" / "config.json").unlink()
    assert _train(root, broken, data, "dpo", "b1") == 2
    err = capsys.readouterr().err
    assert "lists 'transformer' (SD3Transformer2DModel)" in err and "config.json is missing" in err
    assert "Traceback" not in err
    shutil.rmtree(broken)
    shutil.copytree(pipe, broken)
    index = json.loads((broken / "model_index.json").read_text())
    index["transformer"] = ["diffusers", "FluxTransformer2DModel"]
    (broken / "model_index.json").write_text(json.dumps(index))
    assert _train(root, broken, data, "dpo", "b2") == 2
    assert "a FluxTransformer2DModel transformer" in capsys.readouterr().err
    (broken / "model_index.json").write_text("{not json")
    assert _train(root, broken, data, "dpo", "b3") == 2
    assert "cannot read the pipeline's model_index.json" in capsys.readouterr().err
    assert _train(root, pipe, data, "inpo", "b4") == 2
    assert "flow-matching pipeline" in capsys.readouterr().err


def _bright_dark_pairs(root: Path, name: str, rows: int, prompt: str, seed: int) -> Path:
    """`rows` pairs of random 16×16 images: the chosen one bright (pixels 160-255), the rejected dark (0-95)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    lines = []
    for i in range(rows):
        for branch, low in (("c", 160), ("r", 0)):
            pixels = rng.integers(low, low + 96, (16, 16, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / f"{name}{i}{branch}.png")
        row = {
            "prompt": prompt.format(i % 8),
            "chosen": f"img/{name}{i}c.png",
            "rejected": f"img/{name}{i}r.png",
        }
        lines.append(json.dumps(row) + "\n")
    (root / f"{name}.jsonl").write_text("".join(lines))
    return root / f"{name}.jsonl"


def _sample_brightness(folder: Path) -> torch.Tensor:
    """[32] mean pixel of 32 images (8 prompts × 4, 8 Euler steps) from the same seeded noise."""
    pipe = load_pipeline(folder)
    pipe.set_progress_bar_config(disable=True)
    prompts = [f"shape {i}" for i in range(8)] * 4
    out = pipe(prompts, num_inference_steps=8, height=16, width=16, output_type="pt",
               generator=torch.Generator().manual_seed(123))  # fmt: skip
    return out.images.mean(dim=(1, 2, 3))


@pytest.mark.slow
def test_flow_dpo_learns_a_brightness_preference(tmp_path: Path) -> None:
    """Flow-DPO on 32 (bright chosen, dark rejected) pairs, 20 steps: on 16 held-out pairs with new
    images and prompts the loss falls from log 2 and the implicit reward ranks ≥ 90 % right; the
    pipeline's samples from the same noise get brighter by more than 3 paired standard errors."""
    from preftune.config import TrainConfig
    from preftune.train.api import train

    pipe = save_tiny_sd3_pipeline(tmp_path / "pipe")
    data = _bright_dark_pairs(tmp_path, "train", 32, "shape {}", seed=0)
    held = _bright_dark_pairs(tmp_path, "held", 16, "held {}", seed=1)
    config = TrainConfig(method="dpo", model=str(pipe), data=str(data), eval_data=str(held), eval_every=10,
                         out=str(tmp_path / "out"), batch_size=8, max_steps=20, lr=1e-3, scheduler="constant",
                         warmup_ratio=0.0, cache_dir=str(tmp_path / "cache"), progress=False)  # fmt: skip
    before = _sample_brightness(pipe)
    result = train(config)
    assert result.metrics["eval/loss"] < 0.5 * math.log(2)
    assert result.metrics["eval/rewards/accuracy"] >= 0.9
    gain = _sample_brightness(result.final_dir) - before
    assert float(gain.mean()) > 3 * float(gain.std() / math.sqrt(len(gain)))


CUT_WARNINGS = ("The following part of your input was truncated", "Token indices sequence length is longer")


def test_sample_names_cut_prompts_once_without_the_libraries_warnings(
    setup: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A prompt longer than the tiny CLIP tokenizers read (16 tokens): `preftune sample` names it in its
    one notice; transformers' "Token indices sequence length is longer ..." and diffusers' "The following
    part of your input was truncated because CLIP ..." (one per CLIP encoder) are not emitted while
    preftune encodes, and the libraries' log levels are as they were after it."""
    _, pipe, _ = setup
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    keep = Keep(logging.WARNING)
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("blue\na red circle at the top left\n")
    for lg in loggers:
        lg.addHandler(keep)
    try:
        argv = ["sample", "--model", str(pipe), "--prompts", str(prompts), "--out", str(tmp_path / "out"),
                "--steps", "2"]  # fmt: skip
        assert main(argv) == 0
        # quieted only while preftune encodes: the same warning afterwards is emitted
        logging.getLogger("diffusers.pipelines").warning(
            "The following part of your input was truncated (later)"
        )
    finally:
        for lg in loggers:
            lg.removeHandler(keep)
    assert [m for m in seen if m.startswith(CUT_WARNINGS)] == [
        "The following part of your input was truncated (later)"
    ]
    assert [lg.level for lg in loggers] == levels
    out = capsys.readouterr().out
    assert out.count("longer than the text encoder reads (16 tokens") == 1


def test_cut_captions_note_counts_what_t5_cuts(setup: tuple[Path, Path, Path], tmp_path: Path) -> None:
    """With a T5 tokenizer (tokenizer_3; here the tiny CLIP one copied: a token per character, two marks)
    the notice says how many of the cut captions T5 cuts at its T5_TOKENS too."""
    _, pipe, _ = setup
    folder = tmp_path / "pipe"
    for part in ("tokenizer", "tokenizer_3"):
        shutil.copytree(pipe / "tokenizer", folder / part)
    long, longer = "a" * 40, "b" * T5_TOKENS  # 42 and T5_TOKENS + 2 tokens
    note = cut_captions_note(folder, [("red", "p 1"), (long, "p 2"), (longer, "p 3")])
    assert note.startswith("2 of 3 captions are longer than the text encoder reads (16 tokens")
    assert f"as the pipeline cuts a prompt; T5 reads {T5_TOKENS} and cuts 1 of them — e.g. p 2:" in note
    shutil.rmtree(folder / "tokenizer_3")
    assert "T5" not in cut_captions_note(folder, [(long, "p 2")])
