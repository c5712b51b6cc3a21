"""A tiny text-to-image pipeline built from configs (nothing downloaded), for tests and examples.

`save_tiny_pipeline(folder)` writes a `StableDiffusionPipeline` folder (unet/, vae/, text_encoder/,
tokenizer/, scheduler/, model_index.json) that `StableDiffusionPipeline.from_pretrained(folder)`
loads back; `save_tiny_sd3_pipeline(folder)` a `StableDiffusion3Pipeline` folder (an
SD3Transformer2DModel, a VAE with SD3's shift and scaling factors, flow-matching Euler with SD3's
shift 3, two CLIP encoders with projections and no T5), which
`StableDiffusion3Pipeline.from_pretrained(folder, text_encoder_3=None, tokenizer_3=None)` loads. The CLIP tokenizer's vocab.json / merges.txt are written here: one token per
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


def _char_tokenizer(max_tokens: int) -> Any:
    import tempfile

    from transformers import CLIPTokenizer

    with tempfile.TemporaryDirectory() as tmp:
        write_char_tokenizer_files(Path(tmp))
        return CLIPTokenizer(
            str(Path(tmp) / "vocab.json"), str(Path(tmp) / "merges.txt"), model_max_length=max_tokens
        )


def tiny_sd3_components(seed: int = 0, max_tokens: int = MAX_TOKENS) -> dict[str, Any]:
    """The components of a tiny SD3-style pipeline: an SD3Transformer2DModel on 8×8 latents (patch 2),
    a VAE with SD3's shift_factor / scaling_factor (and, as SD3's, no quant convs), SD3's scheduler
    (FlowMatchEulerDiscreteScheduler, shift 3), two character-level CLIP encoders with projections
    (widths 16 + 16 = the joint width 32; pooled 16 + 16 = 32) and no T5 (`text_encoder_3=None`)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    transformer = SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        num_layers=2, attention_head_dim=8, num_attention_heads=2, joint_attention_dim=2 * TEXT_DIM,
        caption_projection_dim=16, pooled_projection_dim=2 * TEXT_DIM, pos_embed_max_size=8,
    )  # fmt: skip
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 8), latent_channels=LATENT_CHANNELS,
        norm_num_groups=4, sample_size=16, shift_factor=0.0609, scaling_factor=1.5305,
        use_quant_conv=False, use_post_quant_conv=False,
    )  # fmt: skip
    tokenizers = [_char_tokenizer(max_tokens) for _ in range(2)]
    tok = tokenizers[0]
    text_config = CLIPTextConfig(
        vocab_size=len(tok.get_vocab()), hidden_size=TEXT_DIM, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, max_position_embeddings=max_tokens, projection_dim=TEXT_DIM,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )  # fmt: skip
    encoders = [CLIPTextModelWithProjection(text_config) for _ in range(2)]
    return {
        "transformer": transformer,
        "vae": vae,
        "scheduler": FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        "text_encoder": encoders[0],
        "tokenizer": tokenizers[0],
        "text_encoder_2": encoders[1],
        "tokenizer_2": tokenizers[1],
        "text_encoder_3": None,
        "tokenizer_3": None,
    }


def save_tiny_sd3_pipeline(folder: str | Path, seed: int = 0) -> Path:
    """Write the tiny SD3-style pipeline as a StableDiffusion3Pipeline folder; returns the folder."""
    from diffusers import StableDiffusion3Pipeline
    from diffusers.utils import logging as diffusers_logging

    pipe = StableDiffusion3Pipeline(**tiny_sd3_components(seed))
    level = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()  # "text_encoder_3=None ... cannot be saved": by design
    try:
        pipe.save_pretrained(str(folder))  # type: ignore[attr-defined]
    finally:
        diffusers_logging.set_verbosity(level)
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
