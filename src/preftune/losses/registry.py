"""The loss registry: a plain dict of name → `LossSpec` (function + metadata).

The trainer, the CLI and the docs read the metadata (data kind, reference, hyper-parameters, paper);
nothing outside this package tests loss names. A run's objective is a weighted sum of registered
terms, parsed by `parse_objective("dpo:1.0,sft:0.2")`.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import torch

from preftune.errors import ConfigError
from preftune.types import PreferenceBatch

LossKind = Literal["pairwise", "unpaired", "listwise", "any", "policy", "distill"]
# "aggregation": a policy term (see losses.policy_losses) divides by its aggregation's global count.
Reduction = Literal["example", "token", "aggregation"]
HParamType = Literal["float", "int", "bool", "str", "floats"]


@dataclass
class LossOutput:
    """What a registered loss returns.

    losses:  [E] float32, unreduced per-example losses; exactly 0 for masked-out examples. For
             `reduction="example"` the trainer divides the sum by the global count of examples, for
             `reduction="token"` by the global count of tokens (see `LossSpec.reduction`).
    metrics: name → [E] float32 per-example values (detached), e.g. `rewards/chosen`.
    state:   the loss's updated running state (detached tensors, checkpointed by the trainer); {} if
             the loss is stateless.
    """

    losses: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    state: dict[str, torch.Tensor] = field(default_factory=dict)


# fn(batch: PreferenceBatch, state: dict[str, Tensor], **hparams) -> LossOutput
LossFn = Callable[..., LossOutput]
F = TypeVar("F", bound=LossFn)


@dataclass(frozen=True)
class BatchStatistic:
    """A detached statistic of the whole global batch that a loss needs (KTO's z₀, BCO's δ).

    sums(batch, **hparams) -> {name: scalar tensor}: detached sums over the batch's examples,
        additive, so that the trainer adds them over all micro-batches and all ranks of a step;
    state(state, sums, **hparams) -> the state to call the loss with on every micro-batch of the
        step, given the loss's running state and the global sums.
    The loss function stays pure: called without this state it estimates the statistic from its
    own batch.
    """

    sums: Callable[..., dict[str, torch.Tensor]]
    state: Callable[..., dict[str, torch.Tensor]]


@dataclass(frozen=True)
class HParam:
    """One hyper-parameter of a loss: default, meaning and valid range.

    `low`/`high` bound numbers (inclusive unless `low_open`/`high_open`), `choices` bounds strings.
    `type` is inferred from the default when not given ("floats" is a tuple of floats).
    """

    default: Any
    doc: str
    low: float | None = None
    high: float | None = None
    choices: tuple[str, ...] | None = None
    low_open: bool = False
    high_open: bool = False
    type: HParamType | None = None

    @property
    def kind(self) -> HParamType:
        if self.type is not None:
            return self.type
        if isinstance(self.default, bool):
            return "bool"
        if isinstance(self.default, int):
            return "int"
        if isinstance(self.default, float):
            return "float"
        if isinstance(self.default, str):
            return "str"
        return "floats"

    def range_text(self) -> str:
        """The valid values as text, e.g. `[0, 0.5)` or `reverse_kl|forward_kl`."""
        if self.choices is not None:
            return "|".join(self.choices)
        if self.low is None and self.high is None:
            return {"bool": "true|false", "floats": "list of numbers"}.get(self.kind, "any")
        lo = "-inf" if self.low is None else f"{self.low:g}"
        hi = "inf" if self.high is None else f"{self.high:g}"
        left = "(" if self.low_open or self.low is None else "["
        right = ")" if self.high_open or self.high is None else "]"
        return f"{left}{lo}, {hi}{right}"

    def coerce(self, name: str, value: Any, where: str) -> Any:
        """Return `value` converted to this parameter's type and checked against its range."""

        def bad(why: str) -> ConfigError:
            return ConfigError(
                f"{where}: hyper-parameter '{name}' = {value!r} {why}; valid: {self.range_text()}"
            )

        kind = self.kind
        if value is None:
            if self.default is None:
                return None
            raise bad("must be set")
        if kind == "bool":
            if isinstance(value, bool):
                return value
            if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
                return value.lower() in ("true", "1", "yes")
            raise bad("is not a boolean")
        if kind == "str":
            if not isinstance(value, str):
                raise bad("is not a string")
            if self.choices is not None and value not in self.choices:
                raise bad("is not one of the choices")
            return value
        if kind == "floats":
            items = value.split(",") if isinstance(value, str) else value
            try:
                out = tuple(float(v) for v in items)
            except (TypeError, ValueError):
                raise bad("is not a list of numbers") from None
            for v in out:
                self._check_number(v, bad)
            return out
        if isinstance(value, bool):
            raise bad("is a boolean, expected a number")
        try:
            number = int(value) if kind == "int" else float(value)
        except (TypeError, ValueError):
            raise bad("is not a number") from None
        if kind == "int" and float(value) != number:
            raise bad("is not an integer")
        self._check_number(float(number), bad)
        return number

    def _check_number(self, v: float, bad: Callable[[str], ConfigError]) -> None:
        if not math.isfinite(v):
            raise bad("is not finite")
        if self.low is not None and (v < self.low or (self.low_open and v == self.low)):
            raise bad("is out of range")
        if self.high is not None and (v > self.high or (self.high_open and v == self.high)):
            raise bad("is out of range")


def _did_you_mean(name: str, options: list[str]) -> str:
    close = difflib.get_close_matches(name, options, n=1, cutoff=0.5)
    return f" — did you mean '{close[0]}'?" if close else ""


@dataclass(frozen=True)
class LossSpec:
    """A registered loss and what the trainer must provide for it.

    kind:             data it trains on: "pairwise" (K=2 chosen, rejected), "unpaired" (K=1 + label),
                      "listwise" (K≥2 best first, ragged via mask), "any" (a term such as sft that
                      uses branch 0 of any kind).
    needs_reference:  whether `batch.ref_logps` (and `ref_token_logps` if token-level) must be given.
    needs_token_logps: whether `batch.policy_token_logps` (and the reference's) must be given.
    needs_mismatched: unpaired only: branch 1 of each example is a completion of a *different* prompt
                      scored under this prompt (KTO's z₀ estimate).
    stateful:         the loss keeps running state (e.g. BCO's δ) that the trainer checkpoints.
    reduction:        "example": divide Σ losses by the global example count; "token": `losses` are
                      per-example token sums, divide by the global response-token count.
    batch_statistic:  a statistic of the whole global batch the trainer computes before the step's
                      micro-batches (see `BatchStatistic`); None for losses without one.
    coupled:          the per-example losses depend on the other examples of the call beyond a
                      batch statistic (e.g. AOT sorts the batch): the loss is computed per
                      micro-batch, so the objective depends on the micro-batch size.
    monotone:         the loss never rises as the preferred response's log-ratio grows; False
                      where the paper's loss has a non-monotone region (DiscoPOP near h = 0).
    Every pairwise loss also takes `wpo_weighting` (WPO, applied by `run`, see `wpo_weights`).
    """

    name: str
    fn: LossFn
    kind: LossKind
    needs_reference: bool
    hparams: Mapping[str, HParam]
    paper: str
    equation: str
    needs_token_logps: bool = False
    needs_mismatched: bool = False
    stateful: bool = False
    reduction: Reduction = "example"
    batch_statistic: BatchStatistic | None = None
    coupled: bool = False
    monotone: bool = True

    @property
    def summary(self) -> str:
        """First line of the loss function's docstring."""
        doc = (self.fn.__doc__ or "").strip()
        return doc.splitlines()[0] if doc else ""

    def defaults(self) -> dict[str, Any]:
        """Every hyper-parameter's default, options every loss of a kind takes (`wpo_weighting`)
        included: a run's resolved hyper-parameters (its config.yaml) name each value it used."""
        return {k: p.default for k, p in self.hparams.items()}

    def validate(self, hparams: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Return `hparams` checked against this spec, coerced, with defaults filled in.

        Raises ConfigError naming the hyper-parameter, its valid range, and a "did you mean" for
        unknown names.
        """
        where = f"loss '{self.name}'"
        given = dict(hparams or {})
        out = self.defaults()
        for key, value in given.items():
            if key not in self.hparams:
                known = ", ".join(sorted(self.hparams)) or "none"
                raise ConfigError(
                    f"{where}: unknown hyper-parameter '{key}'{_did_you_mean(key, list(self.hparams))} "
                    f"(known: {known})"
                )
            out[key] = self.hparams[key].coerce(key, value, where)
        return out

    def run(
        self, batch: PreferenceBatch, state: dict[str, torch.Tensor], hparams: Mapping[str, Any]
    ) -> LossOutput:
        """Call the loss function with validated `hparams`, applying the options every loss of its kind
        takes (WPO weighting of pairwise losses)."""
        given = dict(hparams)
        if not given.pop(WPO_NAME, False):
            return self.fn(batch, state, **given)
        from preftune.losses.core import wpo_weights

        out = self.fn(batch, state, **given)
        weights = wpo_weights(batch)
        metrics = dict(out.metrics, **{"wpo/weight": weights.detach()})
        return LossOutput(out.losses * weights, metrics, out.state)

    def __call__(
        self, batch: PreferenceBatch, state: dict[str, torch.Tensor] | None = None, **hparams: Any
    ) -> LossOutput:
        """Validate `hparams` and call the loss function."""
        return self.run(batch, dict(state or {}), self.validate(hparams))


REGISTRY: dict[str, LossSpec] = {}

WPO_NAME = "wpo_weighting"
WPO = HParam(
    False,
    "WPO: weight each pair's loss by w(y_w)·w(y_l), w = exp(logp_θ(y)/|y|) detached (Zhou et al. 2024, "
    "without the paper's weight alignment)",
)


def register(
    name: str,
    *,
    kind: LossKind,
    needs_reference: bool,
    paper: str,
    equation: str,
    hparams: Mapping[str, HParam] | None = None,
    needs_token_logps: bool = False,
    needs_mismatched: bool = False,
    stateful: bool = False,
    reduction: Reduction = "example",
    batch_statistic: BatchStatistic | None = None,
    coupled: bool = False,
    monotone: bool = True,
) -> Callable[[F], F]:
    """Decorator: add a loss function to `REGISTRY` under `name` with its metadata (a pairwise loss
    also gets the `wpo_weighting` option)."""

    def wrap(fn: F) -> F:
        if name in REGISTRY:
            raise ValueError(f"loss '{name}' registered twice")
        options = {WPO_NAME: WPO} if kind == "pairwise" else {}
        REGISTRY[name] = LossSpec(
            name=name,
            fn=fn,
            kind=kind,
            needs_reference=needs_reference,
            hparams={**dict(hparams or {}), **options},
            paper=paper,
            equation=equation,
            needs_token_logps=needs_token_logps,
            needs_mismatched=needs_mismatched,
            stateful=stateful,
            reduction=reduction,
            batch_statistic=batch_statistic,
            coupled=coupled,
            monotone=monotone,
        )
        return fn

    return wrap


def get(name: str, registry: Mapping[str, LossSpec] | None = None) -> LossSpec:
    """The registered loss `name` (in `registry`, default the offline losses); ConfigError with a
    "did you mean" if unknown."""
    table = REGISTRY if registry is None else registry
    try:
        return table[name]
    except KeyError:
        raise ConfigError(
            f"unknown loss '{name}'{_did_you_mean(name, list(table))} "
            f"(run 'preftune losses' to list them: {', '.join(sorted(table))})"
        ) from None


def parse_objective(
    text: str, registry: Mapping[str, LossSpec] | None = None
) -> list[tuple[LossSpec, float]]:
    """Parse a weighted sum of registered terms, e.g. "dpo:1.0,sft:0.2" → [(dpo, 1.0), (sft, 0.2)].

    A term without a weight has weight 1. Terms must be distinct, weights finite and > 0, and the
    terms must train on one data kind ("any" terms such as sft join any kind).
    """
    terms: list[tuple[LossSpec, float]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            raise ConfigError(f"objective '{text}': empty term; write e.g. 'dpo:1.0,sft:0.2'")
        name, _, weight_text = part.partition(":")
        spec = get(name.strip(), registry)
        try:
            weight = float(weight_text) if weight_text.strip() else 1.0
        except ValueError:
            raise ConfigError(
                f"objective '{text}': weight '{weight_text}' of '{spec.name}' is not a number"
            ) from None
        if not math.isfinite(weight) or weight <= 0:
            raise ConfigError(f"objective '{text}': weight of '{spec.name}' must be finite and > 0")
        if any(s.name == spec.name for s, _ in terms):
            raise ConfigError(f"objective '{text}': '{spec.name}' appears twice; merge its weights")
        terms.append((spec, weight))
    kinds = {s.kind for s, _ in terms} - {"any"}
    if len(kinds) > 1:
        raise ConfigError(
            f"objective '{text}': terms train on different data kinds ({', '.join(sorted(kinds))}); "
            "combine terms of one kind (sft joins any)"
        )
    return terms
