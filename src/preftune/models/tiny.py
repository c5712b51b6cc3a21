"""Tiny causal language models built from configs, for tests and demos (no download).

Each builder makes a real Hugging Face config of a small size, initialises the weights from a seed and
writes the folder with `save_pretrained`, so a test loads it back through `from_pretrained`, the same
path a user's checkpoint takes.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedTokenizerBase

from preftune.errors import ConfigError

TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "phi3", "gemma", "gemma2", "gemma3_text", "gpt2")


# arch → (its transformers config class, tied input/output embeddings)
_CONFIG_CLASSES: dict[str, tuple[str, bool]] = {
    "llama": ("LlamaConfig", False),
    "qwen2": ("Qwen2Config", True),
    "qwen3": ("Qwen3Config", True),
    "phi3": ("Phi3Config", False),
    "gemma3_text": ("Gemma3TextConfig", True),
    "mistral": ("MistralConfig", False),
    "gemma": ("GemmaConfig", True),
    "gemma2": ("Gemma2Config", True),
}


def _family_options(arch: str, head_dim: int, num_layers: int) -> dict[str, Any]:
    """What a family adds to the common settings at a tiny size."""
    # Gemma 2 and 3: sliding layers, q/k scaling by the head size, final-logit soft-capping.
    gemma_sliding = dict(
        head_dim=head_dim, query_pre_attn_scalar=head_dim, sliding_window=16, final_logit_softcapping=5.0
    )
    options: dict[str, dict[str, Any]] = {
        "qwen3": dict(head_dim=head_dim),
        "gemma": dict(head_dim=head_dim),
        # Gemma 3: sliding layers with their own RoPE base alternate with full ones.
        "gemma3_text": dict(
            gemma_sliding, layer_types=(["sliding_attention", "full_attention"] * num_layers)[:num_layers]
        ),
        # Gemma 2: alternating sliding/full layers, attention and final-logit soft-capping: the awkward case.
        "gemma2": dict(gemma_sliding, attn_logit_softcapping=20.0),
        # A short window so that tests exercise sliding-window attention on short sequences.
        "mistral": dict(sliding_window=24),
    }
    return options.get(arch, {})


def _tiny_config(
    arch: str, *, vocab_size: int, hidden_size: int, num_layers: int, special: dict[str, Any]
) -> PretrainedConfig:
    """The config of `arch` at a tiny size: 4 query heads (2 key/value heads where the family has GQA)."""
    heads = 4
    if hidden_size % heads:
        raise ConfigError(
            f"hidden_size={hidden_size} must be a multiple of {heads} (the attention heads)",
        )
    if arch == "gpt2":
        from transformers import GPT2Config

        return GPT2Config(
            vocab_size=vocab_size,
            n_embd=hidden_size,
            n_layer=num_layers,
            n_head=heads,
            n_positions=2048,
            n_inner=2 * hidden_size,
            tie_word_embeddings=True,
            **special,
        )
    if arch not in _CONFIG_CLASSES:
        raise ConfigError(f"unknown tiny architecture '{arch}' — use one of {', '.join(TINY_ARCHS)}")
    import transformers

    name, tied = _CONFIG_CLASSES[arch]
    config_class = getattr(transformers, name)
    return config_class(  # type: ignore[no-any-return]
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=heads,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        tie_word_embeddings=tied,
        **_family_options(arch, hidden_size // heads, num_layers),
        **special,
    )


def save_tiny_model(
    arch: str,
    out_dir: str | Path,
    *,
    vocab_size: int,
    hidden_size: int = 32,
    num_layers: int = 2,
    tokenizer: PreTrainedTokenizerBase | None = None,
    seed: int = 0,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """Build a randomly initialised tiny `arch` model and save it (and `tokenizer`, if given) to `out_dir`.

    arch: one of `TINY_ARCHS` (llama, qwen2, qwen3, mistral, phi3, gemma, gemma2, gemma3_text, gpt2).
    The weights depend only on `seed`.
    `config_overrides` sets config attributes after the defaults (e.g. `initializer_range`).
    Special-token ids come from `tokenizer` when given (pad/bos/eos), else pad=0, bos=1, eos=2 (the ids
    of `preftune.data.char_tokenizer`). Returns the folder, loadable by `load_causal_lm`.
    """
    if tokenizer is not None and len(tokenizer) > vocab_size:
        raise ConfigError(
            f"vocab_size={vocab_size} is smaller than the tokenizer's {len(tokenizer)} tokens",
        )
    special: dict[str, Any] = {"pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2}
    if tokenizer is not None:
        for name in ("pad", "bos", "eos"):
            tid = getattr(tokenizer, f"{name}_token_id")
            if tid is not None:
                special[f"{name}_token_id"] = int(tid)
    config = _tiny_config(
        arch, vocab_size=vocab_size, hidden_size=hidden_size, num_layers=num_layers, special=special
    )
    for key, value in (config_overrides or {}).items():
        setattr(config, key, value)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    finally:
        torch.random.set_rng_state(generator_state)  # building a test model must not move the caller's RNG
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
