"""Reward functions: built-in verifiers, a user's Python callable, weighted sums of several.

Every reward function has the signature of TRL's `reward_funcs`:

    fn(prompts: list[str], completions: list[str], **kwargs) -> list[float | None]

one value per completion; `kwargs` holds the prompt dataset's extra columns (e.g. `answer=[...]`),
each a list aligned with `completions`. `None` means "does not apply to this sample" and adds 0 to a
weighted sum (TRL sums with nansum). A spec names functions with weights:

    "arithmetic"                        the built-in task's verifier (1.0 right answer, else 0.0)
    "arithmetic:1,mymod:length_fn:0.5"  weighted sum; `module:function` imports a callable
    "path/to/rewards.py:fn"             a function from a Python file
    [("arithmetic", 1.0), (my_fn, 0.5)] the same as a list (callables allowed)

    "runs/rm/final" or "model:runs/rm/final"   a trained reward model's score (`load_reward_model`)
    "runs/prm/final" or "prm:min:runs/prm/final" a process reward model: its step values aggregated
                                        by min / last / sum / mean / prod (default: the folder's), or
                                        `prm:steps:…` each a reward at its step's end (PPO's GAE)
    "runs/ens/final", "ensemble:min:runs/ens/final"  an ensemble (its aggregator, or another one)
    "runs/irm/final", "prm:min:runs/irm/final"  an implicit RM (`--head implicit`): β log π_θ/π_ref of
                                        the completion, or its step values q_θ aggregated (a PRM)
"""

from __future__ import annotations

import importlib
import importlib.util
import math
import numbers
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from preftune.errors import ConfigError, PreftuneError

RewardFn = Callable[..., Sequence[float | None]]

BUILTIN: dict[str, RewardFn] = {}


def register_reward(name: str) -> Callable[[RewardFn], RewardFn]:
    """Decorator: add a built-in reward function under `name`."""

    def wrap(fn: RewardFn) -> RewardFn:
        if name in BUILTIN:
            raise ValueError(f"reward '{name}' registered twice")
        BUILTIN[name] = fn
        return fn

    return wrap


@dataclass
class RewardTerm:
    name: str
    fn: RewardFn
    weight: float


@dataclass
class Reward:
    """A weighted sum of reward functions; call it like one: `reward(prompts, completions, **columns)`
    returns a float64 tensor [N]. `last_values` keeps each term's values of the last call (metrics)."""

    terms: list[RewardTerm]
    last_values: dict[str, list[float]] = field(default_factory=dict)

    def __call__(
        self, prompts: Sequence[str], completions: Sequence[str], **columns: Sequence[Any]
    ) -> torch.Tensor:
        n = len(completions)
        if len(prompts) != n:
            raise ConfigError(
                f"reward: {len(prompts)} prompts for {n} completions; give one prompt per completion"
            )
        for key, values in columns.items():
            if len(values) != n:
                raise ConfigError(
                    f"reward: column '{key}' has {len(values)} values for {n} completions; "
                    "repeat each prompt's value for each of its completions"
                )
        total = torch.zeros(n, dtype=torch.float64)
        self.last_values = {}
        for term in self.terms:
            values = _call(term, list(prompts), list(completions), columns, n)
            self.last_values[term.name] = [math.nan if v is None else v for v in values]
            total += term.weight * torch.tensor(
                [0.0 if v is None else v for v in values], dtype=torch.float64
            )
        return total

    def token_rewards(
        self,
        prompts: Sequence[str],
        completions: Sequence[str],
        token_ids: Sequence[Sequence[int]],
        tokenizer: Any,
    ) -> torch.Tensor | None:
        """[N, T] float32 (T the longest of `token_ids`): Σ weight × per-token rewards of the terms that
        give them (`token_level`: a PRM with aggregation `steps`, its step values on the step-end
        tokens); None when no term does. `__call__`'s sum holds their row sums too, so a consumer that
        places them per token takes those sums off the sequence reward."""
        terms = [t for t in self.terms if getattr(t.fn, "token_level", False)]
        if not terms:
            return None
        width = max((len(ids) for ids in token_ids), default=0)
        out = torch.zeros(len(completions), width, dtype=torch.float32)
        for term in terms:
            rows = term.fn.token_rewards(prompts, completions, tokenizer, token_ids=token_ids)  # type: ignore[attr-defined]
            for i, r in enumerate(rows):
                out[i, : len(r)] += term.weight * torch.tensor(r, dtype=torch.float32)
        return out


def _call(
    term: RewardTerm, prompts: list[str], completions: list[str], columns: dict[str, Sequence[Any]], n: int
) -> list[float | None]:
    try:
        out = term.fn(prompts, completions, **{k: list(v) for k, v in columns.items()})
    except PreftuneError:
        raise
    except Exception as e:  # a user's function failed: say which one, keep the cause chained
        raise ConfigError(f"reward '{term.name}' raised {type(e).__name__}: {e}") from e
    if hasattr(out, "tolist") and not isinstance(out, (str, bytes)):  # a tensor or numpy array (as TRL)
        out = out.tolist()
    if not isinstance(out, Sequence) or isinstance(out, (str, bytes)) or len(out) != n:
        got = (
            f"{len(out)} values"
            if isinstance(out, Sequence) and not isinstance(out, (str, bytes))
            else (f"{type(out).__name__} {out!r:.40}")
        )
        raise ConfigError(
            f"reward '{term.name}' returned {got} for {n} completions; return a list of {n} floats"
        )
    values: list[float | None] = []
    for i, v in enumerate(out):
        if v is None:
            values.append(None)
            continue
        if not isinstance(v, numbers.Real) or not math.isfinite(float(v)):  # bools count 1 / 0, as in TRL
            raise ConfigError(
                f"reward '{term.name}' returned {v!r} for completion {i}; rewards must be finite numbers"
            )
        values.append(float(v))
    return values


def _import_callable(ref: str) -> RewardFn:
    """`module:function` or `path/to/file.py:function` → the function."""
    module_name, _, attr = ref.rpartition(":")
    if module_name.endswith(".py"):
        path = Path(module_name)
        if not path.is_file():
            raise ConfigError(f"reward '{ref}': file {path} does not exist")
        spec = importlib.util.spec_from_file_location(f"preftune_reward_{path.stem}", path)
        if spec is None or spec.loader is None:
            raise ConfigError(f"reward '{ref}': cannot load {path} as a Python module")
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise ConfigError(f"reward '{ref}': importing {path} raised {type(e).__name__}: {e}") from e
    else:
        try:
            module = sys.modules.get(module_name) or importlib.import_module(module_name)
        except ImportError as e:
            raise ConfigError(
                f"reward '{ref}': cannot import module '{module_name}' ({e}); put it on PYTHONPATH or "
                f"give a file, e.g. 'path/to/{module_name}.py:{attr}'"
            ) from e
    fn = getattr(module, attr, None)
    if not callable(fn):
        names = sorted(k for k, v in vars(module).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(
            f"reward '{ref}': module '{module_name}' has no function '{attr}' (callables: {', '.join(names) or 'none'})"
        )
    return fn  # type: ignore[no-any-return]


def load_reward_model(path: str | Path, how: str | None = None) -> RewardFn:
    """A trained reward-model folder (`preftune train rm` OUT/final, or any
    `AutoModelForSequenceClassification(num_labels=1)` folder with its tokenizer) as a reward function:
    the scalar score of each completion, read at its last token (docs/reward_models.md). An ensemble
    folder (ensemble.json) gives its members' scores aggregated by `how` (default: its own)."""
    from preftune.reward.ensemble_run import EnsembleRewardFn, is_ensemble
    from preftune.reward.implicit import is_implicit
    from preftune.reward.model_reward import RewardModelFn

    if is_implicit(path):  # β log π_θ/π_ref (preftune train rm/prm --head implicit)
        from preftune.reward.implicit_reward import ImplicitRewardFn

        return ImplicitRewardFn(path)
    if (Path(path) / "prm.json").is_file():  # a process reward model (preftune train prm)
        from preftune.reward.prm_reward import PRMRewardFn

        return PRMRewardFn(path)
    return EnsembleRewardFn(path, how) if is_ensemble(path) else RewardModelFn(path)


def _resolve(name: str) -> RewardTerm:
    """One named reward function: a built-in, a folder (reward model), or `module:function`."""
    if name in BUILTIN:
        return RewardTerm(name, BUILTIN[name], 1.0)
    if name.startswith("prm:"):  # prm:AGGREGATION:PATH or prm:PATH
        from preftune.reward.prm import AGGREGATIONS
        from preftune.reward.prm_reward import PRMRewardFn

        head, _, rest = name[4:].partition(":")
        how = head if head in AGGREGATIONS and rest else None
        folder = rest if how else name[4:]
        from preftune.reward.implicit import is_implicit

        if is_implicit(folder):  # its step values q_θ; an outcome-trained folder defaults to min
            from preftune.reward.implicit_reward import ImplicitRewardFn

            fn = ImplicitRewardFn(folder, aggregation=how)
            if fn.aggregation == "outcome":
                fn = ImplicitRewardFn(folder, aggregation="min")
            return RewardTerm(name, fn, 1.0)
        return RewardTerm(name, PRMRewardFn(folder, aggregation=how), 1.0)
    if name.startswith("ensemble:"):  # ensemble:AGG:PATH
        how, _, folder = name.removeprefix("ensemble:").partition(":")
        return RewardTerm(name, load_reward_model(folder, how), 1.0)
    if name.startswith("model:") or Path(name).is_dir():
        return RewardTerm(name, load_reward_model(name.removeprefix("model:")), 1.0)
    if ":" in name:
        return RewardTerm(name, _import_callable(name), 1.0)
    known = ", ".join(sorted(BUILTIN))
    raise ConfigError(f"unknown reward '{name}' (built-in: {known}; or a Python function 'module:function')")


def _parse_part(part: str, text: str) -> RewardTerm:
    name, weight = part, 1.0
    head, sep, tail = part.rpartition(":")
    if sep:
        try:
            weight, name = float(tail), head
        except ValueError:
            pass
        if not math.isfinite(weight) and head.strip().endswith(".py"):  # file.py:nan is a function
            weight, name = 1.0, part
    if not name:
        raise ConfigError(f"reward '{text}': a term has no name; write e.g. 'arithmetic:1,mymod:fn:0.5'")
    term = _resolve(name.strip())
    term.weight = weight
    return term


def load_reward(spec: str | RewardFn | Sequence[Any]) -> Reward:
    """A `Reward` from a spec string, a callable, or a list of names/callables/(name or callable,
    weight) pairs. Weights must be finite and non-zero; a name may not appear twice."""
    if isinstance(spec, str):
        parts = [p.strip() for p in spec.split(",")]
        if any(not p for p in parts):
            raise ConfigError(f"reward '{spec}': empty term; write e.g. 'arithmetic:1,mymod:fn:0.5'")
        terms = [_parse_part(p, spec) for p in parts]
    elif callable(spec):
        terms = [RewardTerm(getattr(spec, "__name__", "reward"), spec, 1.0)]
    else:
        terms = []
        for item in spec:
            what, weight = item if isinstance(item, tuple) else (item, 1.0)
            term = (
                _resolve(what)
                if isinstance(what, str)
                else RewardTerm(getattr(what, "__name__", "reward"), what, 1.0)
            )
            term.weight = float(weight)
            terms.append(term)
    if not terms:
        raise ConfigError("reward: no reward function given; e.g. 'arithmetic'")
    names = [t.name for t in terms]
    for t in terms:
        if not math.isfinite(t.weight) or t.weight == 0:
            raise ConfigError(f"reward: weight of '{t.name}' must be finite and non-zero, got {t.weight}")
        if names.count(t.name) > 1:
            raise ConfigError(f"reward: '{t.name}' appears twice; merge its weights")
    return Reward(terms)
