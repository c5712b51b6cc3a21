"""The pipeline and the image preference data both sides of diffusion_dpo_vs_diffusers.py train on.

Everything is built from configs (nothing downloaded) and written to disk the way a user would hand
it to either tool: a `StableDiffusionPipeline` folder (`save_pretrained`) and a Pick-a-Pic style
Parquet file (`caption`, `jpg_0`, `jpg_1` JPEG bytes, `label_0`) that both `datasets.load_dataset`
(the diffusers script) and preftune read.

Sizes (`SPECS`): "bench" is a small SD-1.5-shaped pipeline whose VAE encoder costs 1.38× the
FLOPs of one UNet forward (SD 1.5 at 512 px: 1.39×, see `sd15_flops`), so the share of each step the
per-step re-encoding takes is the share it takes at full size; "quick" is a seconds-long toy.
The VAE's posterior is made near-deterministic (log-variance −30, σ ≈ 3e-7) so the script's
`latent_dist.sample()` and preftune's cached posterior mean are the same latents to ~1e-7, which is
what lets the first-step losses be compared exactly.
"""

from __future__ import annotations

import io
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any


@dataclass(frozen=True)
class PipeSpec:
    """A Stable-Diffusion-shaped pipeline: image side R px, latents 4 × R/2^(levels−1) squared."""

    resolution: int
    unet_channels: tuple[int, ...]
    unet_layers: int
    vae_channels: tuple[int, ...]
    text_dim: int
    text_layers: int
    max_tokens: int
    groups: int

    @property
    def latent_side(self) -> int:
        return self.resolution // 2 ** (len(self.vae_channels) - 1)


SPECS = {
    # 64 px images → 4×16×16 latents; UNet 4.5M, VAE 1.6M, text encoder 0.14M parameters.
    "bench": PipeSpec(64, (32, 64, 128), 2, (32, 48, 96), 64, 2, 32, 8),
    # 128 px images through an SD-like 8× VAE (4 levels) → 4×16×16 latents; UNet 17.8M, VAE 3.9M,
    # text encoder 0.47M parameters; VAE encode = 1.44× a UNet forward in FLOPs (SD 1.5: 1.39×).
    "wide": PipeSpec(128, (64, 128, 256), 2, (32, 64, 128, 128), 128, 2, 32, 8),
    # 16 px images → 4×8×8 latents (the smoke test's size: every code path, timings meaningless).
    "quick": PipeSpec(16, (8, 16), 1, (8, 8), 16, 1, 24, 4),
}


def components(spec: PipeSpec, seed: int = 0) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, scheduler of `spec` (the character-level CLIP tokenizer of
    preftune's tiny pipeline), seeded."""
    import tempfile

    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from preftune.diffusion.tiny import write_char_tokenizer_files

    torch.manual_seed(seed)
    levels = len(spec.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=spec.latent_side,
        in_channels=4,
        out_channels=4,
        layers_per_block=spec.unet_layers,
        block_out_channels=spec.unet_channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        cross_attention_dim=spec.text_dim,
        attention_head_dim=8,
        norm_num_groups=spec.groups,
    )
    vae = AutoencoderKL(
        block_out_channels=spec.vae_channels,
        down_block_types=("DownEncoderBlock2D",) * len(spec.vae_channels),
        up_block_types=("UpDecoderBlock2D",) * len(spec.vae_channels),
        latent_channels=4,
        norm_num_groups=spec.groups,
        sample_size=spec.resolution,
    )
    with torch.no_grad():  # log-variance −30 everywhere: sample() = mean + 3e-7·z
        vae.quant_conv.weight[4:].zero_()
        vae.quant_conv.bias[4:].fill_(-30.0)
    with tempfile.TemporaryDirectory() as tmp:
        write_char_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=spec.max_tokens
        )
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer.get_vocab()),
            hidden_size=spec.text_dim,
            intermediate_size=4 * spec.text_dim,
            num_hidden_layers=spec.text_layers,
            num_attention_heads=4,
            max_position_embeddings=spec.max_tokens,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    scheduler = DDPMScheduler(
        num_train_timesteps=1000, beta_schedule="scaled_linear", clip_sample=False, steps_offset=1
    )
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "tokenizer": tokenizer,
        "scheduler": scheduler,
    }


def save_pipeline(spec: PipeSpec, folder: Path, seed: int = 0) -> Path:
    """`folder` as a StableDiffusionPipeline folder of `spec` (loadable by `from_pretrained`)."""
    from diffusers import StableDiffusionPipeline

    parts = components(spec, seed)
    pipe = StableDiffusionPipeline(
        **parts, safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(folder))  # type: ignore[attr-defined]
    (folder / "bench_spec.json").write_text(json.dumps(asdict(spec)))
    return folder


def _jpeg(pixels: Any) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_pickapic(folder: Path, pairs: int, spec: PipeSpec, seed: int = 0) -> Path:
    """`folder/train.parquet`: `pairs` Pick-a-Pic rows of R×R JPEGs (smooth colour fields plus noise),
    unique captions, `label_0` alternating 1 / 0 (so both sides' winner/loser swap is exercised)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    r = spec.resolution
    yy, xx = np.mgrid[0:r, 0:r] / r

    def image() -> bytes:
        a, b, c = rng.uniform(0, 255, 3), rng.uniform(-128, 128, 3), rng.uniform(-128, 128, 3)
        field = a + b * xx[..., None] + c * yy[..., None] + rng.normal(0, 20, (r, r, 3))
        return _jpeg(np.clip(field, 0, 255).astype(np.uint8))

    colours = ["red", "blue", "green", "gold", "grey", "pink"]
    captions = [f"{colours[i % 6]} {i}"[: spec.max_tokens - 2] for i in range(pairs)]
    table = pa.table(
        {
            "caption": captions,
            "jpg_0": [image() for _ in range(pairs)],
            "jpg_1": [image() for _ in range(pairs)],
            "label_0": [1 - (i % 2) for i in range(pairs)],
        }
    )
    folder.mkdir(parents=True, exist_ok=True)
    pq.write_table(table, folder / "train.parquet")
    return folder / "train.parquet"


def flops_per_image(spec: PipeSpec) -> dict[str, float]:
    """Forward FLOPs per image (torch's FlopCounterMode) of the VAE encoder, the text encoder and the
    UNet of `spec`, on meta tensors (no memory, no time)."""
    import torch

    with torch.device("meta"):
        parts = components(spec)
    return _count(parts["unet"], parts["vae"], parts["text_encoder"], spec.resolution, spec.max_tokens)


def sd15_flops() -> dict[str, float]:
    """The same counts for Stable Diffusion 1.5 at 512 px (its published configs, built on meta)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(
            sample_size=64,
            cross_attention_dim=768,
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=8,
        )
        vae = AutoencoderKL(
            block_out_channels=(128, 256, 512, 512),
            down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4,
            layers_per_block=2,
            sample_size=512,
        )
        text = CLIPTextModel(
            CLIPTextConfig(
                hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12
            )
        )
    return _count(unet, vae, text, 512, 77)


def _count(unet: Any, vae: Any, text: Any, resolution: int, tokens: int) -> dict[str, float]:
    import torch
    from torch.utils.flop_counter import FlopCounterMode

    side = resolution // 2 ** (len(vae.config.block_out_channels) - 1)
    dim = unet.config.cross_attention_dim

    def count(fn: Any) -> float:
        with FlopCounterMode(display=False) as mode, torch.no_grad():
            fn()
        return float(mode.get_total_flops())

    with torch.device("meta"):
        x, img = torch.randn(1, 4, side, side), torch.randn(1, 3, resolution, resolution)
        cond, ids = torch.randn(1, tokens, dim), torch.zeros(1, tokens, dtype=torch.long)
        t = torch.tensor([500])
        out = {
            "unet_forward": count(lambda: unet(x, t, cond)),
            "vae_encode": count(lambda: vae.encode(img)),
            "text_encode": count(lambda: text(ids)),
        }

    def params(m: Any) -> float:
        return float(sum(p.numel() for p in m.parameters()))

    out.update(unet_params=params(unet), vae_params=params(vae), text_params=params(text))
    return out


def op_rates(spec: PipeSpec, folder: Path, images: int = 8, repeats: int = 3) -> dict[str, Any]:
    """Achieved forward FLOP rate of the VAE encoder and the UNet of the saved pipeline on `images`
    images (best of `repeats`, process CPU time, this process's threads), and the UNet forward's top
    operators by self CPU time (torch.profiler): why re-encoding weighs less in time than in FLOPs."""
    import time

    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from torch.profiler import ProfilerActivity, profile

    flops = flops_per_image(spec)
    vae = AutoencoderKL.from_pretrained(str(folder), subfolder="vae").eval()
    unet = UNet2DConditionModel.from_pretrained(str(folder), subfolder="unet").eval()
    side = spec.latent_side
    x, img = torch.randn(images, 4, side, side), torch.randn(images, 3, spec.resolution, spec.resolution)
    cond, t = torch.randn(images, spec.max_tokens, spec.text_dim), torch.randint(0, 1000, (images,))
    calls = {"vae_encode": lambda: vae.encode(img), "unet_forward": lambda: unet(x, t, cond)}
    out: dict[str, Any] = {}
    with torch.no_grad():
        for name, fn in calls.items():
            fn()
            best = float("inf")
            for _ in range(repeats):
                c0 = time.process_time()
                fn()
                best = min(best, time.process_time() - c0)
            out[name] = {"cpu_s": best, "gflop_per_cpu_s": images * flops[name] / best / 1e9}
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            calls["unet_forward"]()
    rows = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in rows) or 1.0
    out["unet_top_ops"] = [(e.key, round(e.self_cpu_time_total / total, 3), e.count) for e in rows[:8]]
    return out
