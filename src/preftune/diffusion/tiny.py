"""A tiny text-to-image pipeline built from configs (nothing downloaded), for tests and examples.

`save_tiny_pipeline(folder)` writes a `StableDiffusionPipeline` folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json) that `StableDiffusionPipeline.from_pretrained(folder)`
loads back. The CLIP tokenizer's vocab.json / merges.txt are written here: one token per
byte-level character (with and without CLIP's end-of-word mark) and no merges, so any prompt
tokenizes character by character.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

LATENT_CHANNELS = 4
TEXT_DIM = 16
MAX_TOKENS = 16


def _byte_chars() -> list[str]:
    """The 256 printable stand-ins for bytes used by byte-level BPE (GPT-2 / CLIP)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    keep += list(range(ord("®"), ord("ÿ") + 1))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_char_tokenizer_files(folder: Path) -> None:
    """vocab.json and merges.txt of a character-level CLIP tokenizer in `folder`."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_chars()
    tokens = chars + [c + "</w>" for c in chars] + ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}), encoding="utf-8")
    (folder / "merges.txt").write_text("#version: 0.2\n", encoding="utf-8")


def tiny_components(seed: int = 0, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """unet, vae, text_encoder, tokenizer, scheduler of a ~100k-parameter SD-style pipeline whose
    character-level tokenizer reads `max_tokens` tokens (start and end marks included)."""
    import tempfile

    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=LATENT_CHANNELS,
        out_channels=LATENT_CHANNELS,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM,
        attention_head_dim=2,
        norm_num_groups=4,
    )
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        block_out_channels=(8, 8),
        latent_channels=LATENT_CHANNELS,
        norm_num_groups=4,
        sample_size=16,
    )
    with tempfile.TemporaryDirectory() as tmp:
        write_char_tokenizer_files(Path(tmp))
        tokenizer = CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_tokens
        )
    text_config = CLIPTextConfig(
        vocab_size=len(tokenizer.get_vocab()),
        hidden_size=TEXT_DIM,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        max_position_embeddings=max_tokens,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    text_encoder = CLIPTextModel(text_config)
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


def save_tiny_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny pipeline as a StableDiffusionPipeline folder; returns the folder."""
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline(
        **tiny_components(seed), safety_checker=None, feature_extractor=None, requires_safety_checker=False
    )
    pipe.save_pretrained(str(folder))  # type: ignore[attr-defined]
    return Path(folder)


def encode_prompts(tokenizer: Any, text_encoder: Any, prompts: list[str]) -> torch.Tensor:
    """[N, L, D] text embeddings of `prompts` (padded to the tokenizer's max length), no gradient."""
    ids = tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    with torch.no_grad():
        return text_encoder(ids.to(text_encoder.device))[0]


def write_image_pairs(
    folder: str | Path, pairs: int = 4, *, size: int = 16, seed: int = 0, name: str = "pairs.jsonl"
) -> Path:
    """`folder/NAME` (pairs.jsonl) with `pairs` rows {prompt, chosen, rejected} over random PNG images in
    `folder/img/` (test data for the image pipeline); returns the JSONL path."""
    import numpy as np
    from PIL import Image

    root = Path(folder)
    (root / "img").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(pairs):
        for branch in ("chosen", "rejected"):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / "img" / f"{i}-{branch}.png")
        rows.append(
            {"prompt": f"shape {i}", "chosen": f"img/{i}-chosen.png", "rejected": f"img/{i}-rejected.png"}
        )
    out = root / name
    out.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out
