"""Reading and checking the training configuration. `TrainConfig` (`preftune.config_fields`) is one typed
dataclass that is the defaults, the CLI `--help` and the logged run config at once (cleanrl's habit).

`TrainConfig` fields carry their help text in `field(metadata={"help": ...})`; `preftune train --help`
is generated from it. A config comes from YAML (`load_config`), then command-line overrides; loss
hyper-parameters (`beta`, `gamma`, ...) may appear as flat keys and are routed to every term of the
objective that declares them, or as `TERM.KEY` (e.g. `sft.weight`) for one term. `validate` checks
everything that can be checked without a model: unknown keys (with a "did you mean"), ranges, choices,
the loss hyper-parameters through `LossSpec.validate`, and whether the method's reference can exist.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from preftune.config_fields import FIELDS, SINKS, TrainConfig, field_type
from preftune.errors import ConfigError
from preftune.method_checks import check_distill, is_distill, validate_online
from preftune.online_methods import PRESETS, builder_of, expand, is_online
from preftune.paths import is_pipeline_folder
from preftune.trl_names import HELP as TRL_HELP
from preftune.trl_names import apply_rpo_alpha, translate


def did_you_mean(name: str, options: list[str]) -> str:
    """ "; did you mean 'X'?" for a likely typo of option X, else "". With the same number of
    '_'-separated words, every word must be a near-spelling of X's (so `save_steps` never suggests
    `max_steps`, nor `rpo_alpha` `apo_alpha`: different words, different meanings)."""
    words = name.split("_")
    for close in difflib.get_close_matches(name, options, n=5, cutoff=0.6):
        other = close.split("_")
        if len(other) == len(words):
            if all(difflib.SequenceMatcher(None, a, b).ratio() >= 0.75 for a, b in zip(words, other)):
                return f"; did you mean '{close}'?"
        elif difflib.SequenceMatcher(None, name, close).ratio() >= 0.8:
            return f"; did you mean '{close}'?"
    return ""


def coerce_value(name: str, value: Any, where: str = "config") -> Any:
    """Convert `value` (from YAML or the command line) to the type of field `name`."""
    base, optional = field_type(name)

    def bad(why: str) -> ConfigError:
        return ConfigError(f"{where}: '{name}' = {value!r} {why} — {FIELDS[name].metadata['help']}")

    if value is None or (optional and isinstance(value, str) and value.lower() in ("none", "null")):
        if optional:
            return None
        raise bad("must be set")
    if base is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise bad("is not true/false")
    if base is int:
        if isinstance(value, bool):
            raise bad("is a boolean, expected an integer")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise bad("is not an integer") from None
        if not number.is_integer():
            raise bad("is not an integer")
        return int(number)
    if base is float:
        if isinstance(value, bool):
            raise bad("is a boolean, expected a number")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise bad("is not a number") from None
        if not math.isfinite(out):
            raise bad("is not finite")
        return out
    if base is str:
        if isinstance(value, (dict, list)):
            raise bad("is not a string")
        return str(value)
    if base is list:
        if isinstance(value, str):
            return [v.strip() for v in value.split(",") if v.strip()]
        if isinstance(value, (list, tuple)):
            return [str(v) for v in value]
        raise bad("is not a list")
    if base is dict:
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise bad("is not a JSON object") from None
        if not isinstance(value, dict):
            raise bad("is not a mapping")
        return dict(value)
    raise bad(f"has an unsupported type {base}")  # pragma: no cover - all fields covered above


def config_from_dict(values: Mapping[str, Any], *, where: str = "config") -> TrainConfig:
    """Build a `TrainConfig` from a flat mapping. Keys that are not fields are loss hyper-parameters
    (checked by `validate` against the objective), so typos are reported there with a "did you mean"."""
    kwargs: dict[str, Any] = {}
    hparams: dict[str, Any] = {}
    values = translate(values, where)
    apply_rpo_alpha(values, where)
    for key, value in values.items():
        key = str(key).replace("-", "_") if str(key).replace("-", "_") in FIELDS else str(key)
        if key == "hparams":
            if not isinstance(value, Mapping):
                raise ConfigError(f"{where}: 'hparams' must be a mapping such as {{beta: 0.1}}")
            hparams.update(value)
        elif key in FIELDS:
            kwargs[key] = coerce_value(key, value, where)
        else:
            hparams[key] = value
    config = TrainConfig(**kwargs)
    config.hparams = hparams
    _route_shared_keys(config, kwargs)
    return config


# Keys that are both a config field and a loss or estimator hyper-parameter: `gamma` is the PPO
# family's discount, SimPO's / AlphaPO's target margin and REINFORCE++'s discount.
SHARED_KEYS = ("gamma",)


def _route_shared_keys(config: TrainConfig, given: Mapping[str, Any]) -> None:
    """A shared key given flat goes to the hyper-parameter that reads it when the field would not be
    read: an offline method's term (`preftune train simpo --gamma 0.5` sets SimPO's γ, not the unused
    discount), an online builder's objective term (`online_dpo --objective simpo`) or an online
    estimator other than the PPO family's gae (`reinforce_pp --gamma 0.9`: its return's discount)."""
    if is_distill(config.method):
        return
    takers = _shared_key_takers(config)
    for key in SHARED_KEYS:
        if key in given and key not in config.hparams and key in takers:
            config.hparams[key] = given[key]
            setattr(config, key, FIELDS[key].default)


def _shared_key_takers(config: TrainConfig) -> set[str]:
    """The hyper-parameter names of the parts of `config.method` that take flat keys besides the config
    fields: the offline terms (of an offline method or an online builder) or the online estimator
    (none for gae, whose γ and λ are the config fields); empty for an unknown method or part."""
    from preftune.losses import parse_objective

    try:
        if not is_online(config.method):
            return {k for spec, _ in parse_objective(config.method) for k in spec.hparams}
        estimator, text, _, _ = expand(config.method, config.estimator, config.objective)
        if builder_of(config.method):
            return {k for spec, _ in parse_objective(text) for k in spec.hparams}
        from preftune.rl import ESTIMATORS

        spec = ESTIMATORS.get(estimator)
        return set(spec.hparams) if spec is not None and estimator != "gae" else set()
    except (ConfigError, ValueError):
        return set()  # an unknown method or term: `validate` names it


def load_config(path: str | Path | None = None, overrides: Mapping[str, Any] | None = None) -> TrainConfig:
    """Read a YAML config (optional), apply `overrides` (CLI values win), return the unvalidated config."""
    values: dict[str, Any] = {}
    where = "command line"
    if path is not None:
        p = Path(path)
        where = str(p)
        if not p.is_file():
            raise ConfigError(f"config file '{p}' does not exist")
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys to values")
        values.update(translate(loaded, where))
    for key, value in translate(overrides or {}, "command line").items():
        if key == "hparams":
            values.setdefault("hparams", {})
            values["hparams"] = {**values["hparams"], **value}
        else:
            values[key] = value
    return config_from_dict(values, where=where)


def config_to_dict(
    config: TrainConfig, objective: list[tuple[Any, float, dict[str, Any]]] | None = None
) -> dict[str, Any]:
    """The config as a plain mapping. With `objective` (from `validate`), `hparams` holds every
    resolved loss hyper-parameter, defaults included — flat keys for a one-term method, `TERM.KEY`
    otherwise — so the mapping loads back (`load_config`) to the same objective."""
    values = dataclasses.asdict(config)
    if objective is not None:
        online = is_online(config.method)
        # online: TERM.KEY, apart from the estimator's keys (a builder's offline objective: as offline)
        one = len(objective) == 1 and (not online or bool(builder_of(config.method)))
        values["hparams"] = {
            (key if one else f"{spec.name}.{key}"): list(v) if isinstance(v, tuple) else v
            for spec, _, hp in objective
            for key, v in hp.items()
        }
        if online and builder_of(config.method):  # the builder's options (rl.builders)
            from preftune.rl.builders import builder_options

            values["hparams"].update(builder_options(config.method, config.hparams))
        elif online:
            from preftune.online_options import recorded_hparams

            extra = recorded_hparams(config.method, config.estimator, config.objective, config.hparams)
            values["hparams"].update(extra)
    return values


def save_config(
    config: TrainConfig, path: str | Path, objective: list[tuple[Any, float, dict[str, Any]]] | None = None
) -> None:
    """Write `config_to_dict(config, objective)` as YAML (a run's OUT/config.yaml)."""
    text = yaml.safe_dump(config_to_dict(config, objective), sort_keys=False, allow_unicode=True)
    Path(path).write_text(text, encoding="utf-8")


def _check_range(config: TrainConfig) -> None:
    for name, f in FIELDS.items():
        value = getattr(config, name)
        meta = f.metadata
        if value is None:
            continue
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(
                f"'{name}' = {value!r} is not one of {', '.join(meta['choices'])}"
                f"{did_you_mean(str(value), list(meta['choices']))}"
            )
        low, high = meta.get("low"), meta.get("high")
        if low is not None and (value < low or (meta.get("low_open") and value == low)):
            raise ConfigError(
                f"'{name}' = {value} must be {'>' if meta.get('low_open') else '≥'} {low} — {meta['help']}"
            )
        if high is not None and (value > high or (meta.get("high_open") and value == high)):
            raise ConfigError(
                f"'{name}' = {value} must be {'<' if meta.get('high_open') else '≤'} {high} — {meta['help']}"
            )


def resolve_objective(config: TrainConfig) -> list[tuple[Any, float, dict[str, Any]]]:
    """[(LossSpec, weight, validated hyper-parameters)] of the config's objective.

    Flat keys go to every term that declares them; `TERM.KEY` to one term. A key no term declares is
    an error with a "did you mean" over config fields and the terms' hyper-parameters; two keys that
    set one term's value differently (`--beta 0.1 --dpo.beta 0.2`) are an error naming both.
    """
    terms, given, defaults, builder_keys = _objective_parts(config)
    per_term = _route_hparams(config, terms, given, builder_keys)
    for key, value in defaults.items():
        for spec, _ in terms:
            if key in spec.hparams:
                per_term[spec.name].setdefault(key, value)
    return [(spec, weight, spec.validate(per_term[spec.name])) for spec, weight in terms]


def _objective_parts(
    config: TrainConfig,
) -> tuple[list[tuple[Any, float]], Mapping[str, Any], dict[str, Any], set[str]]:
    """(terms, the hyper-parameters given for them, the method's defaults, keys that are an online
    builder's options) of the config's method: an offline objective, an online preset's policy
    objective (the estimator's keys gone to it) or its builder's offline one, a distillation objective."""
    from preftune import losses

    if is_online(config.method):  # a preset: its policy objective (kind "policy"), overridable
        if builder_of(config.method):  # sampled groups → offline examples: an offline objective
            from preftune.rl.builders import BUILDERS

            _, text, defaults, _ = expand(config.method, config.estimator, config.objective)
            builder_keys = set(BUILDERS[builder_of(config.method)].hparams)
            return losses.parse_objective(text), config.hparams, defaults, builder_keys
        from preftune.losses.policy_losses import parse_policy_objective
        from preftune.online_options import resolve_online

        online = resolve_online(config.method, config.estimator, config.objective, config.hparams)
        return parse_policy_objective(online.objective), online.term_hparams, online.defaults, set()
    if is_distill(config.method):  # teacher distributions (kind "distill")
        from preftune.losses.distill_losses import parse_distill_objective

        return parse_distill_objective(config.method), config.hparams, {}, set()
    return losses.parse_objective(config.method), config.hparams, {}, set()


def _route_hparams(
    config: TrainConfig, terms: list[tuple[Any, float]], given: Mapping[str, Any], skip: set[str]
) -> dict[str, dict[str, Any]]:
    """Each term's given hyper-parameters (before defaults): flat keys to every term that declares
    them, `TERM.KEY` to that term (over a flat key several terms share); keys in `skip` (a
    builder's options) are left out. A term's value set by two keys with different values is refused
    (`_check_one_value`)."""
    per_term: dict[str, dict[str, Any]] = {spec.name: {} for spec, _ in terms}
    sources: dict[tuple[str, str], list[tuple[str, Any]]] = {}  # (term, name) → [(key, value)]
    dotted = {tuple(str(k).rsplit(".", 1)) for k in given if "." in str(k)}  # (term, name) set alone
    for key, value in given.items():
        if key in skip:  # an option of the online method's example builder (rl.builders)
            continue
        term, dot, name = str(key).rpartition(".")
        if dot:
            if term not in per_term:
                raise ConfigError(
                    f"hyper-parameter '{key}': '{term}' is not a term of method '{config.method}'"
                )
            sources.setdefault((term, name), []).append((key, value))
            continue
        takers = [spec.name for spec, _ in terms if key in spec.hparams]
        if key == "beta" and not takers and "orpo" in per_term:
            # TRL's ORPOConfig.beta is λ, the odds-ratio weight (Hong et al. 2024, ORPO, eq. 6)
            name, takers = "odds_ratio_weight", ["orpo"]
        if not takers:
            _unknown_option(config, terms, str(key), skip)
        for t in takers:
            if len(takers) > 1 and (t, name) in dotted:
                continue  # a flat key shared by several terms, TERM.KEY overriding it for one
            sources.setdefault((t, name), []).append((key, value))
    specs = {spec.name: spec for spec, _ in terms}
    for (term, name), values in sources.items():
        _check_one_value(specs[term], name, values)
        per_term[term][name] = next((v for k, v in values if "." in k), values[0][1])  # TERM.KEY first
    return per_term


def _unknown_option(config: TrainConfig, terms: list[tuple[Any, float]], key: str, extra: set[str]) -> None:
    """ConfigError for a flat key no term of the objective declares, with a "did you mean" over the
    terms' keys, the config fields, TRL's names and `extra` (a builder's options)."""
    known = sorted(
        ({k for spec, _ in terms for k in spec.hparams} | set(FIELDS) | set(TRL_HELP) | extra) - {"hparams"}
    )
    hint = " (TRL's label_smoothing is ε of rdpo, TRL's 'robust', and of cdpo)" if key == "epsilon" else ""
    raise ConfigError(
        f"unknown option '{key}' for method '{config.method}'{did_you_mean(key, known)}{hint} "
        f"(config fields: see 'preftune train --help'; loss options: 'preftune losses')"
    )


def _check_one_value(spec: Any, name: str, values: list[tuple[str, Any]]) -> None:
    """Keys that set term `spec`'s `name` (a flat key, its `TERM.KEY`, TRL's ORPO `beta`) agree: the
    same value twice is fine, different ones are an error naming both flags (none silently wins)."""
    hp = spec.hparams.get(name)
    if hp is None or len(values) < 2:
        return  # an unknown name: `spec.validate` names it
    where = f"loss '{spec.name}'"
    seen = {repr(hp.coerce(key, value, where)): (key, value) for key, value in values}
    if len(seen) < 2:
        return
    flags = " and ".join(f"--{k if '.' in k else k.replace('_', '-')} {v}" for k, v in seen.values())
    raise ConfigError(
        f"{flags} both set {spec.name}'s {name} — give one of them, or the same value (a flat key sets "
        f"every term that has it, --{spec.name}.{name} that term alone; in a config file the same keys)"
    )


def reference_strategy(config: TrainConfig, needs_reference: bool) -> str:
    """The reference strategy a run uses: 'none', 'cache', 'model' or 'adapter' ('auto' resolved).

    Online methods score new samples every step, which a cache of fixed examples cannot key: their
    `auto` is the adapter-disabled policy under LoRA, else a frozen copy of the initial model."""
    if not needs_reference:
        return "none"
    if config.reference != "auto":
        return config.reference
    if is_online(config.method) or is_pipeline_folder(config.model):  # noise differs every step
        return "adapter" if config.lora else "model"
    return "model" if config.ref_sync_every > 0 else "cache"


def check_terms_known(method: str) -> None:
    """Each term of an offline objective ("dpo", "dpo:1,sft:0.2") names a registered loss; an unknown
    name is matched against every method family (a mistyped online preset is not an offline loss)."""
    from preftune import losses
    from preftune.losses.catalogue import unknown_method

    for part in method.split(","):
        name = part.partition(":")[0].strip()
        if name and name not in losses.REGISTRY:
            raise ConfigError(unknown_method(name))


def validate(config: TrainConfig) -> list[tuple[Any, float, dict[str, Any]]]:
    """Check `config` before any model loads; return the resolved objective (see `resolve_objective`)."""
    online = is_online(config.method)
    if not online and not is_distill(config.method):
        check_terms_known(config.method)
    if not online:
        _check_no_online_fields(config)
    for name in ("model", "out") if online else ("model", "data", "out"):
        if not getattr(config, name):
            raise ConfigError(f"'{name}' is required — {FIELDS[name].metadata['help']}")
    _check_range(config)
    for sink in config.report_to:
        if sink not in SINKS:
            raise ConfigError(
                f"report_to: unknown sink '{sink}'{did_you_mean(sink, list(SINKS))} (known: {', '.join(SINKS)})"
            )
    _check_optimizer(config.optimizer)
    objective = resolve_objective(config)
    needs_ref = any(spec.needs_reference for spec, _, _ in objective)
    strategy = reference_strategy(config, needs_ref)
    _check_reference(config, strategy, needs_ref)
    if online:
        validate_online(config, strategy)
    check_distill(config, objective)
    _check_phases(config, objective, strategy, needs_ref)
    return objective


def _check_no_online_fields(config: TrainConfig) -> None:
    """An offline method given fields only online methods read (`--temperature`, `--num-generations`,
    `--prompts`, ...) is refused, naming them: they would be ignored."""
    from preftune.config_fields import online_only_fields

    if config.gamma != FIELDS["gamma"].default:  # a loss's γ went to hparams (`_route_shared_keys`)
        raise ConfigError(
            f"gamma = {config.gamma:g}: no term of '{config.method}' has a γ, and the PPO family's discount "
            "is for online methods — remove it"
        )
    defaults = TrainConfig()
    given = sorted(n for n in online_only_fields() if getattr(config, n) != getattr(defaults, n))
    if given:
        flags = ", ".join(f"--{n.replace('_', '-')}" for n in given)
        hint = " (the preference pairs are --data)" if config.prompts and not config.data else ""
        raise ConfigError(
            f"{flags}: for the online methods ({', '.join(PRESETS)}), not '{config.method}', which would "
            f"ignore {'it' if len(given) == 1 else 'them'} — remove {'it' if len(given) == 1 else 'them'}{hint}"
        )


def _check_reference(config: TrainConfig, strategy: str, needs_ref: bool) -> None:
    """The reference options agree with the method and with each other."""
    if needs_ref and strategy == "none":
        raise ConfigError(
            f"method '{config.method}' needs a reference model but reference='none' — use "
            "reference=cache (default), model or adapter"
        )
    if not needs_ref and (
        config.ref_model or config.reference not in ("auto", "none") or config.ref_sync_every
    ):
        raise ConfigError(
            f"method '{config.method}' is reference-free: remove ref_model / reference / "
            "ref_sync_every (they would be ignored)"
        )
    if config.merge_lora and not config.lora:
        raise ConfigError("merge_lora merges LoRA adapters into the weights; it needs lora=true (--lora)")
    if strategy == "adapter" and not config.lora:
        raise ConfigError("reference='adapter' (the policy with LoRA adapters disabled) needs lora=true")
    if strategy == "adapter" and config.ref_model:
        raise ConfigError("reference='adapter' uses the policy's base weights; remove ref_model")
    if config.ref_sync_every and strategy != "model":
        raise ConfigError(
            f"ref_sync_every (TR-DPO) updates the reference during training, which needs "
            f"reference='model', not '{strategy}'"
        )


def _check_phases(
    config: TrainConfig, objective: list[tuple[Any, float, dict[str, Any]]], strategy: str, needs_ref: bool
) -> None:
    """Evaluation, rounds, stages and precision options agree with each other and the objective."""
    if config.eval_every and not config.eval_data:
        raise ConfigError("eval_every > 0 needs eval_data")
    if config.apo_alpha and config.rounds < 2:
        raise ConfigError("apo_alpha (Accelerated PO) extrapolates between rounds: set rounds ≥ 2")
    if config.stages > 1 and config.rounds > 1:
        raise ConfigError("stages (Curry-DPO) and rounds (iterative / Accelerated PO) cannot be combined")
    if config.stages > 1 and any(spec.kind not in ("pairwise", "any") for spec, _, _ in objective):
        raise ConfigError("stages (Curry-DPO) build pairs from ranked data: use a pairwise loss")
    if (config.stages > 1 or config.rounds > 1) and strategy == "adapter":
        raise ConfigError(
            "stages / rounds move the reference to the policy of the previous phase; "
            "reference='adapter' cannot follow it — use reference=cache (default)"
        )
    if (
        (config.stages > 1 or config.rounds > 1 or config.ref_sync_every)
        and strategy == "model"
        and config.lora
    ):
        raise ConfigError(
            "a moving reference model (TR-DPO sync, stages, rounds) needs full fine-tuning, "
            "not lora — or use reference=cache for stages/rounds"
        )
    if config.mixed_precision != "no" and config.dtype != "float32":
        raise ConfigError(
            f"mixed_precision={config.mixed_precision} keeps float32 weights and computes in bfloat16; "
            f"dtype={config.dtype} would already hold the weights in low precision — set dtype=float32, "
            "or mixed_precision=no"
        )
    if (config.stages > 1 or config.rounds > 1) and not needs_ref:
        raise ConfigError("stages and rounds move the reference between stages; the method uses none")


def _check_optimizer(name: str) -> None:
    import torch.optim

    if optimizer_class(name) is None:
        names = [
            n
            for n in dir(torch.optim)
            if isinstance(getattr(torch.optim, n), type)
            and issubclass(getattr(torch.optim, n), torch.optim.Optimizer)
            and n != "Optimizer"
        ]
        raise ConfigError(
            f"optimizer '{name}' is not a torch.optim optimizer"
            f"{did_you_mean(name.lower(), [n.lower() for n in names])} (known: {', '.join(names)})"
        )


def optimizer_class(name: str) -> Any:
    """The torch.optim class called `name`, case-insensitive ('adamw' → AdamW), or None."""
    import torch.optim

    for attr in dir(torch.optim):
        obj = getattr(torch.optim, attr)
        if attr.lower() == name.lower() and isinstance(obj, type) and issubclass(obj, torch.optim.Optimizer):
            return obj
    return None
