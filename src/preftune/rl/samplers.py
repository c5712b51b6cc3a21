"""The sampler registry: which prompts an online step samples, how many completions each, which groups
it keeps. A sampler is the only part of the loop that may draw more than it trains on.

    sampler = make_sampler("dapo_filter", {"max_draws": 4})
    selection = sampler.select(source, batch_size=16, num_generations=8)    # source: a StepSource
    selection.groups       # kept groups: rows of selection.drawn, one list per prompt
    sampler.state_dict()   # tensors the checkpoint stores (VADE's posterior); {} when stateless

Hyper-parameters are declared with `preftune.losses.HParam` (default, meaning, range) and checked
before the run starts (`--sampler NAME --sampler-args '{"key": value}'`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from preftune.errors import ConfigError
from preftune.losses.registry import HParam, _did_you_mean
from preftune.rl.draws import Drawn, StepSource


@dataclass
class Selection:
    """The outcome of a sampler for one step: everything drawn, the groups kept (lists of rows of
    `drawn`, each all of one prompt) and the sampler's metrics."""

    drawn: Drawn
    groups: list[list[int]]
    metrics: dict[str, float] = field(default_factory=dict)


class Sampler(Protocol):
    """What the online phase calls each step; `state_dict` / `load_state_dict` cover all its state."""

    def select(self, source: StepSource, batch_size: int, num_generations: int) -> Selection: ...

    def state_dict(self) -> dict[str, torch.Tensor]: ...

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None: ...


@dataclass(frozen=True)
class SamplerSpec:
    """A registered sampler: its factory `make(prompts, **hparams)` and its metadata."""

    name: str
    make: Callable[..., Sampler]
    paper: str
    rule: str
    hparams: Mapping[str, HParam] = field(default_factory=dict)
    # every kept prompt gets exactly num_generations samples (False: the sampler sets each prompt's count)
    fixed_groups: bool = True

    def validate(self, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        where = f"sampler '{self.name}'"
        out = {k: p.default for k, p in self.hparams.items()}
        for key, value in (hparams or {}).items():
            if key not in self.hparams:
                known = ", ".join(sorted(self.hparams)) or "none"
                raise ConfigError(
                    f"{where}: unknown option '{key}'{_did_you_mean(key, list(self.hparams))} (known: {known})"
                )
            out[key] = self.hparams[key].coerce(key, value, where)
        return out


SAMPLERS: dict[str, SamplerSpec] = {}


def register_sampler(
    name: str,
    *,
    paper: str,
    rule: str,
    hparams: Mapping[str, HParam] | None = None,
    fixed_groups: bool = True,
) -> Callable[[Callable[..., Sampler]], Callable[..., Sampler]]:
    """Decorator: add a sampler factory (a class taking `prompts` and its hyper-parameters)."""

    def wrap(make: Callable[..., Sampler]) -> Callable[..., Sampler]:
        if name in SAMPLERS:
            raise ValueError(f"sampler '{name}' registered twice")
        SAMPLERS[name] = SamplerSpec(name, make, paper, rule, dict(hparams or {}), fixed_groups)
        return make

    return wrap


def get_sampler(name: str) -> SamplerSpec:
    """The registered sampler `name`; ConfigError with a "did you mean" if unknown."""
    try:
        return SAMPLERS[name]
    except KeyError:
        raise ConfigError(
            f"unknown sampler '{name}'{_did_you_mean(name, list(SAMPLERS))} (known: {', '.join(sorted(SAMPLERS))})"
        ) from None


def make_sampler(name: str, hparams: Mapping[str, Any] | None = None, *, prompts: int = 0) -> Sampler:
    """A sampler instance for a phase of `prompts` prompts, its options checked."""
    spec = get_sampler(name)
    return spec.make(prompts, **spec.validate(hparams))


class Stateless:
    """Mixin for samplers without state between steps."""

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        if state:
            raise ConfigError(
                f"resume: the checkpoint holds sampler state {sorted(state)}, this sampler has none"
            )


def by_prompt(drawn: Drawn, rows: range | list[int]) -> list[list[int]]:
    """`rows` split into groups of equal prompt, in order of first appearance."""
    groups: dict[int, list[int]] = {}
    for r in rows:
        groups.setdefault(drawn.prompt[r], []).append(r)
    return list(groups.values())


def flat(drawn: Drawn, rows: list[int]) -> bool:
    """All of the rows' rewards are equal: group-relative advantages are 0, no gradient."""
    values = drawn.rewards[rows]
    return bool(values.max() == values.min())


@register_sampler(
    "uniform",
    paper="Shao et al. 2024, DeepSeekMath §4.1 (GRPO's group sampling)",
    rule="the step's batch_size prompts, num_generations completions each, every group kept",
)
class Uniform(Stateless):
    def __init__(self, prompts: int) -> None:
        pass

    def select(self, source: StepSource, batch_size: int, num_generations: int) -> Selection:
        drawn = source.draw(source.batch, num_generations)
        return Selection(drawn, by_prompt(drawn, range(len(drawn))))


@register_sampler(
    "dapo_filter",
    paper="Yu et al. 2025, DAPO §3.2 Dynamic Sampling (Algorithm 1, lines 6–7)",
    rule="drop groups whose rewards are all equal; draw further prompts until batch_size groups are kept",
    hparams={
        "max_draws": HParam(
            4, "engine calls per step at most, the first included (DAPO's max_num_gen_batches)", low=1
        )
    },
)
class DapoFilter(Stateless):
    """DAPO's dynamic sampling: 0 < |{o_i : is_equivalent(a, o_i)}| < G for every kept group.

    Yu et al. 2025 eq. 11's constraint, for any reward: a group is kept unless all its rewards are
    equal. After the step's batch, each further draw samples as many new prompts as groups are
    missing (never a prompt twice in a step), up to `max_draws` draws; kept groups beyond batch_size
    are cut. When every draw's groups are flat the step trains on the first draw (a zero gradient)
    rather than on nothing."""

    def __init__(self, prompts: int, *, max_draws: int) -> None:
        self.max_draws = max_draws

    def select(self, source: StepSource, batch_size: int, num_generations: int) -> Selection:
        drawn, kept, prompts, draws = Drawn(), [], list(source.batch), 0
        while prompts and draws < self.max_draws:
            rows = drawn.extend(source.draw(prompts, num_generations))
            draws += 1
            kept += [g for g in by_prompt(drawn, rows) if not flat(drawn, g)]
            if len(kept) >= batch_size:
                break
            prompts = source.more(batch_size - len(kept))
        first = by_prompt(drawn, range(len(source.batch) * num_generations))
        groups = kept[:batch_size] or first
        metrics = {"sampler/draws": float(draws), "sampler/kept": float(len(kept[:batch_size]))}
        return Selection(drawn, groups, metrics)


def largest_remainder(weights: torch.Tensor, total: int) -> torch.Tensor:
    """Non-negative integers proportional to `weights` summing to `total` (Hamilton's method: floors,
    then one more for the largest remainders, ties to the lower index); all 0 when weights sum to 0."""
    w = weights.double().clamp(min=0)
    if float(w.sum()) <= 0 or total <= 0:
        return torch.zeros(len(w), dtype=torch.long)
    exact = w / w.sum() * total
    base = exact.floor().long()
    left = total - int(base.sum())
    order = sorted(range(len(w)), key=lambda i: (-(float(exact[i]) - int(base[i])), i))
    for i in order[:left]:
        base[i] += 1
    return base
