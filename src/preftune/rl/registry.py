"""The advantage-estimator registry: name → `EstimatorSpec` (pure function + metadata).

An estimator maps the rewards of a batch of sampled completions, grouped by prompt, to one advantage
per completion. Hyper-parameters are declared with `preftune.losses.HParam` (default, meaning, valid
range) exactly like the loss registry, and checked before the function runs.

    from preftune import rl
    adv = rl.advantages("grpo", rewards, groups)                  # [N]
    est = rl.estimate("rloo", rewards, groups)                   # Estimate(advantages, metrics)
    est.metrics["zero_signal_fraction"]
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from preftune.errors import ConfigError
from preftune.losses.registry import HParam, _did_you_mean
from preftune.rl.groups import (
    Groups,
    check_rewards,
    make_groups,
    zero_advantage_fraction,
    zero_signal_fraction,
)

# fn(rewards [N] (or [N, C]), groups: Groups, **inputs, **hparams) -> advantages [N] (or [N, T])
EstimatorFn = Callable[..., torch.Tensor]
F = TypeVar("F", bound=EstimatorFn)


@dataclass(frozen=True)
class EstimatorSpec:
    """A registered advantage estimator.

    inputs:   extra tensors the function reads besides rewards and groups, name → meaning (e.g.
              ReMax's `baseline_rewards`); `required` lists those that must be given.
    columns:  the estimator accepts rewards [N, C] with several reward components.
    """

    name: str
    fn: EstimatorFn
    paper: str
    equation: str
    hparams: Mapping[str, HParam] = field(default_factory=dict)
    inputs: Mapping[str, str] = field(default_factory=dict)
    required: tuple[str, ...] = ()
    columns: bool = False
    # samples of one prompt the baseline needs: with fewer every advantage is 0 (a group baseline)
    min_group: int = 1

    @property
    def summary(self) -> str:
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def validate(self, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """`hparams` coerced and range-checked, defaults filled in; ConfigError on unknown names."""
        where = f"estimator '{self.name}'"
        out = {k: p.default for k, p in self.hparams.items()}
        for key, value in (hparams or {}).items():
            if key not in self.hparams:
                known = ", ".join(sorted(self.hparams)) or "none"
                raise ConfigError(
                    f"{where}: unknown hyper-parameter '{key}'{_did_you_mean(key, list(self.hparams))} "
                    f"(known: {known})"
                )
            out[key] = self.hparams[key].coerce(key, value, where)
        return out


@dataclass
class Estimate:
    """Advantages [N] (float, the rewards' dtype; [N, T] for token-level returns) and batch metrics:
    `zero_signal_fraction` (groups whose rewards are all equal; with `baseline_rewards`, ReMax's,
    groups whose advantages are all 0), `reward_mean`, `reward_std`,
    `groups`, `advantage_mean`, `advantage_abs_mean`."""

    advantages: torch.Tensor
    metrics: dict[str, float]


REGISTRY: dict[str, EstimatorSpec] = {}


def register(
    name: str,
    *,
    paper: str,
    equation: str,
    hparams: Mapping[str, HParam] | None = None,
    inputs: Mapping[str, str] | None = None,
    required: tuple[str, ...] = (),
    columns: bool = False,
    min_group: int = 1,
) -> Callable[[F], F]:
    """Decorator: add an estimator function to `REGISTRY` under `name` with its metadata."""

    def wrap(fn: F) -> F:
        if name in REGISTRY:
            raise ValueError(f"estimator '{name}' registered twice")
        REGISTRY[name] = EstimatorSpec(
            name, fn, paper, equation, dict(hparams or {}), dict(inputs or {}), required, columns, min_group
        )
        return fn

    return wrap


def get(name: str) -> EstimatorSpec:
    """The registered estimator `name`; ConfigError with a "did you mean" if unknown."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise ConfigError(
            f"unknown estimator '{name}'{_did_you_mean(name, list(REGISTRY))} "
            f"(known: {', '.join(sorted(REGISTRY))})"
        ) from None


def _split_inputs(spec: EstimatorSpec, kwargs: dict[str, Any]) -> dict[str, torch.Tensor]:
    where = f"estimator '{spec.name}'"
    inputs: dict[str, torch.Tensor] = {}
    for key in list(kwargs):
        if key in spec.inputs:
            value = kwargs.pop(key)
            if value is None:
                continue
            inputs[key] = torch.as_tensor(value)
    missing = [k for k in spec.required if k not in inputs]
    if missing:
        raise ConfigError(f"{where}: needs {missing[0]}= ({spec.inputs[missing[0]]})")
    return inputs


def estimate(name: str, rewards: torch.Tensor, groups: torch.Tensor, **kwargs: Any) -> Estimate:
    """Advantages of estimator `name` for `rewards` [N] grouped by prompt index `groups` [N], with
    batch metrics. Extra keyword arguments are the estimator's inputs (tensors, e.g. ReMax's
    `baseline_rewards=`) and hyper-parameters (e.g. `scale="batch"` for grpo)."""
    spec = get(name)
    where = f"estimator '{name}'"
    rewards = check_rewards(rewards, where, columns=spec.columns)
    grouped: Groups = make_groups(groups.to(rewards.device), rewards.shape[0], where)
    inputs = _split_inputs(spec, kwargs)
    hparams = spec.validate(kwargs)
    adv = spec.fn(rewards, grouped, **inputs, **hparams)
    flat = rewards if rewards.dim() == 1 else rewards.mean(dim=1)
    baseline = "baseline_rewards" in inputs  # ReMax: the signal is against the greedy reward
    zero = zero_advantage_fraction(adv, grouped) if baseline else zero_signal_fraction(rewards, grouped)
    metrics = {
        "zero_signal_fraction": zero,
        "reward_mean": float(flat.mean()),
        "reward_std": float(flat.std(unbiased=False)),
        "groups": float(grouped.size),
        "advantage_mean": float(adv.mean()),
        "advantage_abs_mean": float(adv.abs().mean()),
    }
    return Estimate(adv, metrics)


def advantages(name: str, rewards: torch.Tensor, groups: torch.Tensor, **kwargs: Any) -> torch.Tensor:
    """The advantages of estimator `name` (see `estimate`, which also returns the batch metrics)."""
    return estimate(name, rewards, groups, **kwargs).advantages
