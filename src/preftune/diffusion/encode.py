"""VAE latents and text embeddings of image preference data, cached on disk by fingerprint.

The denoiser is the only part a diffusion preference run trains; the VAE and the text encoder are
frozen, so each image's latent and each caption's embedding are computed once and stored in
`$PREFTUNE_CACHE/diffusion/FINGERPRINT.safetensors` (the diffusers research script re-encodes every
image every step). The fingerprint covers the VAE, text encoder(s) and tokenizer(s) files of the
pipeline folder (and an SD3 transformer's config.json, whose widths shape the embedding), the
resolution, and every image's SHA-256 and caption, so any change makes a new entry. The file is
written to a temporary name and renamed; one that cannot be read is recomputed.

Latents are the VAE posterior mean times `scaling_factor` (minus `shift_factor` first, where the VAE
has one: SD3's); images are resized (shorter side) and centre-cropped to the resolution, scaled to
[−1, 1]. A UNet pipeline's caption embedding is its text encoder's last hidden states [L, D]; an
SD3-style pipeline's is what `StableDiffusion3Pipeline.encode_prompt` returns (both CLIP encoders'
penultimate hidden states side by side, padded to the joint width and followed by T5's tokens — zeros
when the pipeline has no T5 — and the pooled projections), packed into [L + 1, D] by
`seam.pack_conditioning`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from preftune.diffusion.imagedata import ImageRecord

ENCODED_PARTS = (
    "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2", "text_encoder_3", "tokenizer_3"
)  # fmt: skip
ENCODED_FILES = ("transformer/config.json",)  # an SD3 transformer's widths shape its embeddings
VERSION = "1"
T5_TOKENS = 256  # the T5 tokens an SD3-style pipeline reads (StableDiffusion3Pipeline's default)


def model_index(folder: str | Path) -> dict[str, Any]:
    """The pipeline folder's model_index.json."""
    return json.loads((Path(folder) / "model_index.json").read_text(encoding="utf-8"))  # type: ignore[no-any-return]


def default_resolution(folder: str | Path) -> int:
    """Pixels per side the denoiser was built for: its sample_size × the VAE's down-scaling factor."""
    root = Path(folder)
    denoiser = "unet" if (root / "unet").is_dir() else "transformer"
    sample = json.loads((root / denoiser / "config.json").read_text(encoding="utf-8")).get("sample_size", 64)
    vae = json.loads((root / "vae" / "config.json").read_text(encoding="utf-8"))
    scale = 2 ** (len(vae.get("block_out_channels", [0])) - 1)
    return int(sample if isinstance(sample, int) else sample[0]) * scale


def parts_fingerprint(folder: str | Path) -> str:
    """SHA-256 over the names and bytes of every file of the encoding parts (VAE, text encoders,
    tokenizers; those a pipeline lacks are skipped) and of ENCODED_FILES where present."""
    h = hashlib.sha256(VERSION.encode())
    root = Path(folder)
    files = [sorted(p for p in (root / part).rglob("*") if p.is_file()) for part in ENCODED_PARTS]
    extra = [root / name for name in ENCODED_FILES if (root / name).is_file()]
    for file in [f for part in files for f in part] + extra:
        h.update(str(file.relative_to(root)).encode())
        with open(file, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def data_fingerprint(parts: str, resolution: int, digests: Sequence[str], captions: Sequence[str]) -> str:
    text = json.dumps([parts, resolution, sorted(digests), sorted(captions)])
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_encoders(folder: str | Path) -> tuple[Any, Any, Any]:
    """(vae, tokenizer, text_encoder) of a pipeline folder, frozen, in eval mode."""
    import diffusers
    import transformers

    from preftune.diffusion.denoiser import component

    index = model_index(folder)
    vae_cls = getattr(diffusers, index.get("vae", ["diffusers", "AutoencoderKL"])[1])
    with component(folder, "vae"):
        vae = vae_cls.from_pretrained(str(folder), subfolder="vae")
    text_cls = getattr(transformers, index.get("text_encoder", ["transformers", "CLIPTextModel"])[1])
    with component(folder, "text_encoder"):
        text_encoder = text_cls.from_pretrained(str(folder), subfolder="text_encoder")
    with component(folder, "tokenizer"):
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder), subfolder="tokenizer")
    for module in (vae, text_encoder):
        module.requires_grad_(False).eval()
    return vae, tokenizer, text_encoder


def load_vae(folder: str | Path) -> Any:
    """The pipeline's VAE, frozen, in eval mode."""
    import diffusers

    from preftune.diffusion.denoiser import component

    vae_cls = getattr(diffusers, model_index(folder).get("vae", ["diffusers", "AutoencoderKL"])[1])
    with component(folder, "vae"):
        return vae_cls.from_pretrained(str(folder), subfolder="vae").requires_grad_(False).eval()


def caption_encoder(folder: str | Path) -> Callable[[list[str]], torch.Tensor]:
    """captions → [P, L, D] embeddings, as the pipeline conditions its denoiser (module docstring)."""
    from preftune.diffusion.tiny import encode_prompts

    if (Path(folder) / "unet").is_dir() or "transformer" not in model_index(folder):
        _, tokenizer, text_encoder = load_encoders(folder)
        return lambda captions: encode_prompts(tokenizer, text_encoder, captions)
    return _pooled_prompt_encoder(folder)


def _pooled_prompt_encoder(folder: str | Path) -> Callable[[list[str]], torch.Tensor]:
    """An SD3-style pipeline's `encode_prompt` (no classifier-free guidance, max_sequence_length
    `T5_TOKENS`, the pipeline's default), its outputs packed, the libraries' own warnings about cut
    prompts quieted (`quiet_cut_warnings`); the transformer is built on the meta device (only its
    config is read: the width of T5's zeros) and the VAE is not loaded."""
    import diffusers

    from preftune.diffusion.denoiser import load_pipeline
    from preftune.diffusion.seam import pack_conditioning

    index = model_index(folder)
    transformer_cls = getattr(diffusers, index["transformer"][1])
    with torch.device("meta"):
        stand_in = transformer_cls.from_config(
            transformer_cls.load_config(str(folder), subfolder="transformer")
        )
    pipe = load_pipeline(folder, transformer=stand_in, vae=None)

    def encode(captions: list[str]) -> torch.Tensor:
        with torch.no_grad(), quiet_cut_warnings():
            embeds, _, pooled, _ = pipe.encode_prompt(
                prompt=captions, prompt_2=None, prompt_3=None, device=torch.device("cpu"),
                do_classifier_free_guidance=False, max_sequence_length=T5_TOKENS,
            )  # fmt: skip
        return pack_conditioning(embeds, pooled)

    return encode


def pixels(data: bytes, resolution: int, *, where: Callable[[], tuple[str, int, str]]) -> torch.Tensor:
    """[3, R, R] in [−1, 1]: the image resized (shorter side to R) and centre-cropped."""
    from PIL import Image

    from preftune.diffusion.imagedata import open_image

    image = open_image(data, where)
    w, h = image.size
    scale = resolution / min(w, h)
    image = image.resize(
        (max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.Resampling.BICUBIC
    )
    w, h = image.size
    left, top = (w - resolution) // 2, (h - resolution) // 2
    image = image.crop((left, top, left + resolution, top + resolution))
    raw = torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)
    return raw.view(resolution, resolution, 3).permute(2, 0, 1).float() / 127.5 - 1.0


@torch.no_grad()
def vae_latents(vae: Any, images: torch.Tensor, batch: int = 16) -> torch.Tensor:
    """[N, C, h, w] latents of [N, 3, R, R] images: posterior mean, shifted and scaled as the VAE says."""
    out = []
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    for i in range(0, images.shape[0], batch):
        mean = vae.encode(images[i : i + batch].to(vae.device, vae.dtype)).latent_dist.mean
        out.append(((mean - shift) * vae.config.scaling_factor).float().cpu())
    return torch.cat(out)


@torch.no_grad()
def text_embeddings(
    encode: Callable[[list[str]], torch.Tensor], captions: list[str], batch: int = 64
) -> torch.Tensor:
    """[P, L, D] embeddings of the captions by `encode` (`caption_encoder`), in batches."""
    parts = [encode(captions[i : i + batch]) for i in range(0, len(captions), batch)]
    return torch.cat(parts).float().cpu()


def encode_records(
    records: list[ImageRecord],
    folder: str | Path,
    *,
    data_path: str,
    cache_dir: Path,
    resolution: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """({image digest: latent [C, h, w]}, {caption: embedding [L, D]}) for every image and caption of
    `records`, read from the cache when its fingerprint is there, else computed and stored."""
    resolution = resolution or default_resolution(folder)
    digests = sorted({d for r in records for d in r.digests})
    captions = sorted({c for r in records for c in r.captions})
    fingerprint = data_fingerprint(parts_fingerprint(folder), resolution, digests, captions)
    file = cache_dir / f"{fingerprint}.safetensors"
    cached = _read(file, len(digests), len(captions))
    if cached is not None:
        log(
            f"diffusion data: {len(digests)} latents and {len(captions)} text embeddings from the cache {file}"
        )
        latents, texts = cached
    else:
        latents, texts = _compute(records, folder, digests, captions, resolution, data_path)
        _write(file, latents, texts)
        log(f"diffusion data: encoded {len(digests)} images and {len(captions)} captions (cache {file})")
        note = cut_captions_note(
            folder, ((c, f"{data_path} row {r.row}") for r in records for c in r.captions)
        )
        if note:
            log(f"diffusion data: {note}")
    return dict(zip(digests, latents)), dict(zip(captions, texts))


@contextmanager
def quiet_cut_warnings() -> Iterator[None]:
    """Within: transformers' and diffusers' loggers print errors only, so their own warnings about a
    text cut to the encoder's length ("Token indices sequence length is longer than ...", "The
    following part of your input was truncated because CLIP can only handle ..." and T5's) stay out of
    the way of preftune's one notice (`cut_captions_note`); their levels are restored on the way out."""
    loggers = [logging.getLogger(name) for name in ("transformers", "diffusers")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(max(logging.ERROR, lg.getEffectiveLevel()))
        yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def cut_captions_note(folder: str | Path, places: Iterable[tuple[str, str]]) -> str:
    """A notice naming the captions of `places` ((caption, where it is read: "FILE row N"), a caption
    counted once, at its first place) longer than the pipeline's (first) tokenizer reads — its text
    encoder sees them cut there, as when the pipeline samples — or "" when none is. An SD3-style
    pipeline with T5 (tokenizer_3) reads `T5_TOKENS` tokens there: the notice says how many it cuts."""
    where: dict[str, str] = {}
    for caption, place in places:
        where.setdefault(caption, place)
    counted = _token_counts(Path(folder) / "tokenizer", list(where))
    cut = [c for c in where if counted and counted[1][c] > counted[0]]
    if not counted or not cut:
        return ""
    limit, lengths = counted
    t5 = _token_counts(Path(folder) / "tokenizer_3", cut, T5_TOKENS)
    t5_cut = (
        ""
        if t5 is None
        else f"; T5 reads {T5_TOKENS} and cuts {sum(n > T5_TOKENS for n in t5[1].values())} of them"
    )
    return (
        f"{len(cut)} of {len(where)} captions are longer than the text encoder reads ({limit} tokens, "
        f"start and end marks included) and are cut there, as the pipeline cuts a prompt{t5_cut} — e.g. "
        f"{where[cut[0]]}: {cut[0]!r} ({lengths[cut[0]]} tokens)"
    )


def _token_counts(
    subfolder: Path, captions: list[str], limit: int | None = None
) -> tuple[int, dict[str, int]] | None:
    """(the tokens the tokenizer in `subfolder` reads — `limit`, else its model_max_length —, each
    caption's tokens uncut); None without a tokenizer there or a limit."""
    import transformers

    if not subfolder.is_dir():
        return None
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(subfolder))
    limit = limit or int(tokenizer.model_max_length)
    if limit <= 0 or limit > 1_000_000:  # a tokenizer without a limit
        return None
    return limit, {c: len(tokenizer(c, verbose=False).input_ids) for c in captions}


def _compute(
    records: list[ImageRecord],
    folder: str | Path,
    digests: list[str],
    captions: list[str],
    resolution: int,
    data_path: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    vae = load_vae(folder)
    first: dict[str, tuple[ImageRecord, int]] = {}
    for r in records:
        for i, d in enumerate(r.digests):
            first.setdefault(d, (r, i))

    def image(d: str) -> torch.Tensor:
        r, i = first[d]
        return pixels(r.images[i], resolution, where=lambda: (data_path, r.row, r.fields[i]))

    stack = torch.stack([image(d) for d in digests])
    return vae_latents(vae, stack), text_embeddings(caption_encoder(folder), captions)


def _read(file: Path, images: int, captions: int) -> tuple[torch.Tensor, torch.Tensor] | None:
    if not file.is_file():
        return None
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(file))
        latents, texts = tensors["latents"], tensors["text"]
    except Exception:  # noqa: BLE001 - a damaged or foreign file is recomputed, never trusted
        return None
    if latents.shape[0] != images or texts.shape[0] != captions:
        return None
    return latents, texts


def _write(file: Path, latents: torch.Tensor, texts: torch.Tensor) -> None:
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    tmp = file.with_name(f".{file.name}.{os.getpid()}.tmp")
    save_file({"latents": latents.contiguous(), "text": texts.contiguous()}, str(tmp))
    os.replace(tmp, file)
