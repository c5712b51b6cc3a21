"""Optimizer and learning-rate schedule: torch.optim by name, linear warmup then constant/linear/cosine."""

from __future__ import annotations

import inspect
import math
from collections.abc import Iterable
from typing import Any

import torch

from preftune.config import TrainConfig, optimizer_class
from preftune.errors import ConfigError


def build_optimizer(params: Iterable[torch.nn.Parameter], config: TrainConfig) -> torch.optim.Optimizer:
    """`config.optimizer` over the trainable `params` with lr, weight decay and `optimizer_args`.

    AdamW's decoupled weight decay (Loshchilov & Hutter 2019) applies to every trainable tensor; the
    usual "no decay on norms and biases" split matters little at the small decays preference tuning uses.

    Optimizers with a fused implementation (AdamW, Adam, SGD, ...) use it unless `optimizer_args` says
    `fused` or `foreach`: one kernel over all tensors instead of one per operation — an AdamW step over
    45M float32 parameters on one CPU thread takes 0.16× the `foreach` time (benchmarks/optimizer_step.py).
    The update is the same up to float rounding.
    """
    cls = optimizer_class(config.optimizer)
    if cls is None:
        raise ConfigError(f"optimizer '{config.optimizer}' is not a torch.optim optimizer")
    kwargs: dict[str, Any] = {"lr": config.lr, **config.optimizer_args}
    # Always pass weight_decay when accepted: AdamW's own default (0.01) must not sneak in.
    if "weight_decay" in inspect.signature(cls.__init__).parameters:
        kwargs.setdefault("weight_decay", config.weight_decay)
    trainable = [p for p in params if p.requires_grad]
    if not trainable:
        raise ConfigError("the model has no trainable parameters")
    if (
        "fused" in inspect.signature(cls.__init__).parameters
        and "fused" not in kwargs
        and "foreach" not in kwargs
    ):
        try:
            return cls(trainable, **kwargs, fused=True)  # type: ignore[no-any-return]
        except (RuntimeError, TypeError):  # a device or dtype the fused kernel lacks: the default path
            pass
    try:
        return cls(trainable, **kwargs)  # type: ignore[no-any-return]
    except TypeError as exc:
        raise ConfigError(f"optimizer '{config.optimizer}' rejected its arguments {kwargs}: {exc}") from None


def lr_factor(step: int, *, total: int, warmup: int, kind: str, min_ratio: float = 0.0) -> float:
    """Multiplier of the peak lr before optimizer step `step` (0-based).

    warmup: (step+1)/warmup for step < warmup (never 0, so the first step moves);
    then with progress p = (step − warmup)/max(1, total − warmup):
    constant 1; linear 1 − (1 − m) p; cosine m + (1 − m)(1 + cos πp)/2 (Loshchilov & Hutter 2017, SGDR eq. 5).
    """
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    if kind == "linear":
        return 1.0 - (1.0 - min_ratio) * p
    if kind == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * p))
    raise ConfigError(f"unknown scheduler '{kind}' (constant | linear | cosine)")


def warmup_steps(config: TrainConfig, total: int) -> int:
    """Warmup steps: `warmup_steps` when set, else round(warmup_ratio · total)."""
    return config.warmup_steps if config.warmup_steps > 0 else int(round(config.warmup_ratio * total))


def build_scheduler(
    optimizer: torch.optim.Optimizer, config: TrainConfig, total: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR following `lr_factor`; its state (last_epoch) is checkpointed."""
    warm = warmup_steps(config, total)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer,
        lambda s: lr_factor(
            s, total=total, warmup=warm, kind=config.scheduler, min_ratio=config.min_lr_ratio
        ),
    )
