"""Load a causal language model: local folder or hub id, dtype, LoRA adapters, gradient checkpointing."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch

from preftune.errors import ConfigError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class LoraSettings:
    """LoRA adapter settings (Hu et al. 2021, "LoRA", eq. 3: h = W₀x + (α/r)·B·A·x).

    r:              rank of the update B·A.
    alpha:          scale α; the update is multiplied by α/r.
    dropout:        dropout on the adapter input.
    target_modules: module names to adapt (e.g. ["q_proj", "v_proj"]), or "all-linear" for every linear
                    layer except the output head.
    """

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ConfigError(f"lora r={self.r}: the rank must be ≥ 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"lora dropout={self.dropout}: must be in [0, 1)")


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Map "float32" / "bfloat16" / "float16" (or a torch dtype) to a torch dtype, with a clear error."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ConfigError(f"dtype '{dtype}' is not supported — use one of {', '.join(DTYPES)}")
    return DTYPES[dtype]


def _check_source(path: str | Path) -> str:
    """Return the string to give `from_pretrained`, or raise if it is neither a model folder nor a hub id."""
    from preftune.paths import pretrained_source

    source = pretrained_source(path, "model")
    local = Path(source)
    if local.exists() and (not local.is_dir() or not (local / "config.json").is_file()):
        raise ConfigError(
            f"model path '{path}' is not a model folder (no config.json in it) — "
            "pass a folder written by save_pretrained or a hub id"
        )
    return source


def load_causal_lm(
    path: str | Path,
    *,
    dtype: str | torch.dtype = "float32",
    lora: LoraSettings | None = None,
    gradient_checkpointing: bool = False,
    attn_implementation: str | None = None,
) -> Any:
    """Load `AutoModelForCausalLM` from a local folder or hub id, optionally with LoRA adapters.

    dtype: weights' dtype ("float32" or "bfloat16"; "float16" is accepted for inference).
    lora: when given, wraps the model in a `peft` LoRA model: only adapter weights are trainable.
    gradient_checkpointing: recompute decoder-layer activations in backward (non-reentrant).
    attn_implementation: "sdpa" (default where supported) or "eager"; packed prefix-shared batches need
        one of them (flash-attention kernels take no custom mask; `logprobs` falls back to padding).
    Returns a torch module in train mode off (eval mode), `config.use_cache` False.
    """
    from transformers import AutoModelForCausalLM

    source = _check_source(path)
    kwargs: dict[str, Any] = {"dtype": resolve_dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model: Any = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise ConfigError(f"could not load a causal LM from '{source}': {exc}") from exc
    model.config.use_cache = False  # training never reuses a KV cache
    if gradient_checkpointing:
        kwargs_ckpt = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers ≥ 5 name
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs_ckpt)
        else:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs_ckpt)
    if lora is not None:
        from peft import LoraConfig, get_peft_model

        peft_config = LoraConfig(
            r=lora.r,
            lora_alpha=cast(Any, lora.alpha),  # peft types it int; a float works
            lora_dropout=lora.dropout,
            target_modules=lora.target_modules,
            task_type="CAUSAL_LM",
        )
        try:
            model = get_peft_model(model, peft_config)
        except ValueError as exc:
            raise ConfigError(
                f"lora target_modules={lora.target_modules!r} do not fit this model: {exc}"
            ) from exc
    model.eval()  # dropout off unless the trainer switches train mode on
    return model


def unwrap_model(model: Any) -> Any:
    """The transformers `*ForCausalLM` module inside `model` (a PEFT wrapper, or the model itself)."""
    if hasattr(model, "get_base_model"):
        return model.get_base_model()
    return model
