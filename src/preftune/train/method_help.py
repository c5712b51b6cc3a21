"""`preftune train METHOD --help`: after the usual options, METHOD's own, read from the registries
that train it — the hyper-parameters of an offline objective's terms, an online preset's advantage
estimator (or example builder), prompt sampler and policy terms, a distillation objective's terms, or
an online diffusion method's options — each as the flags the command line takes (`--KEY V` sets
every term that declares KEY, `--TERM.KEY V` one term). `preftune losses METHOD` has the formulas."""

from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from preftune.errors import PreftuneError


@dataclass(frozen=True)
class Option:
    """One line of a part: its flags, help, and whether the flags take a value V."""

    flags: list[str]
    help: str
    takes_value: bool = True


@dataclass(frozen=True)
class Part:
    """One part of a method (a loss term, the estimator, the sampler, ...): a section of the help."""

    title: str
    text: str
    options: list[Option] = field(default_factory=list)


def method_help(method: str, formatter: argparse.HelpFormatter) -> str:
    """The sections of METHOD's own options (`method_parts`), formatted by `formatter` as argparse
    formats an argument group."""
    for part in method_parts(method):
        formatter.start_section(part.title)
        formatter.add_text(part.text)
        formatter.add_arguments(
            [
                argparse.Action(
                    o.flags,
                    dest=o.flags[0],
                    nargs=None if o.takes_value else 0,
                    metavar="V",
                    help=o.help.replace("%", "%%"),
                )  # fmt: skip
                for o in part.options
            ]
        )
        formatter.end_section()
    return formatter.format_help()


def method_parts(method: str) -> list[Part]:
    """The parts of METHOD (module docstring); for a name no family has, one part naming the closest."""
    from preftune import diffusion_methods
    from preftune.losses.catalogue import unknown_method
    from preftune.losses.distill_losses import parse_distill_objective
    from preftune.losses.registry import parse_objective
    from preftune.method_checks import is_distill
    from preftune.online_methods import is_online

    name = method.strip()
    if is_online(name):
        return _online_parts(name)
    if name in diffusion_methods.METHODS:
        return [_diffusion_part(name)]
    if name in ("rm", "prm"):
        what = "a process reward model" if name == "prm" else "a reward model"
        return [
            Part(f"{name}: {what}", "Its options: the group 'reward models' above (docs/reward_models.md).")
        ]
    try:
        terms = parse_distill_objective(name) if is_distill(name) else parse_objective(name)
    except PreftuneError as err:  # an unknown name or a malformed objective: said under the usual help
        one_name = not any(sign in name for sign in ":,")
        return [Part(f"METHOD {name}", unknown_method(name) if one_name else str(err))]
    return [_term_part(spec, weight, len(terms) > 1) for spec, weight in terms]


def _flags(key: str, term: str | None = None) -> list[str]:
    """The command-line spellings of hyper-parameter `key` (and `--TERM.KEY` for a term's)."""
    flags = [f"--{key.replace('_', '-')}"] + ([f"--{key}"] if "_" in key else [])
    return flags + ([f"--{term}.{key}"] if term else [])


def _hparam_help(hp: Any, preset: dict[str, Any], key: str) -> str:
    """An HParam's help line: its text, valid values and default (an online preset's own named so)."""
    from preftune.losses.docs import default_text, value_text

    default = f"{value_text(preset[key])} in this method" if key in preset else default_text(hp)
    return f"{hp.doc} (valid: {hp.range_text()}; default: {default})"


def _options(hparams: Any, term: str | None = None, preset: dict[str, Any] | None = None) -> list[Option]:
    return [Option(_flags(k, term), _hparam_help(hp, preset or {}, k)) for k, hp in hparams.items()]


def _term_part(spec: Any, weight: float, several: bool, preset: dict[str, Any] | None = None) -> Part:
    """A loss term's hyper-parameters (an offline, policy or distillation term)."""
    title = f"{spec.name}'s hyper-parameters" + (f" (a term of weight {weight:g})" if several else "")
    text = f"{spec.paper}. Formula and details: preftune losses {spec.name}."
    return Part(
        title,
        text + ("" if spec.hparams else " No hyper-parameters."),
        _options(spec.hparams, spec.name, preset),
    )


def _online_parts(name: str) -> list[Part]:
    """An online preset's estimator (or example builder), sampler, policy terms, and the run
    configuration's options only online methods read."""
    from preftune import losses
    from preftune.config_fields import online_only_fields
    from preftune.losses.policy_losses import parse_policy_objective
    from preftune.online_methods import PRESETS
    from preftune.rl.builders import BUILDERS
    from preftune.rl.registry import REGISTRY as ESTIMATORS
    from preftune.rl.samplers import SAMPLERS

    p = PRESETS[name]
    if p.builder:
        builder = BUILDERS[p.builder]
        text = f"{builder.paper}: turns each step's scored samples into {builder.kind} examples."
        parts = [Part(f"example builder {builder.name}", text, _options(builder.hparams))]
    else:
        est = ESTIMATORS[p.estimator]
        text = f"{est.paper}. Others: --estimator {' | '.join(sorted(ESTIMATORS))}."
        parts = [Part(f"advantage estimator {est.name}", text, _options(est.hparams))]
    sampler = SAMPLERS[p.sampler]
    text = (
        f"{sampler.rule.split(';')[0]}. Others: --sampler {' | '.join(sorted(SAMPLERS))}. A sampler's "
        "options are JSON in --sampler-args."
    )
    options = [
        Option([f"--sampler-args '{{\"{k}\": V}}'"], _hparam_help(hp, p.sampler_args, k), takes_value=False)
        for k, hp in sampler.hparams.items()
    ]
    parts.append(Part(f"prompt sampler {sampler.name}", text, options))
    terms = losses.parse_objective(p.objective) if p.builder else parse_policy_objective(p.objective)
    parts += [_term_part(spec, w, len(terms) > 1, dict(p.hparams)) for spec, w in terms]
    fields = ", ".join(f"--{f.replace('_', '-')}" for f in sorted(online_only_fields()))
    kl = f" This method's --kl-coef: {p.kl_coef:g}." if p.estimator == "gae" else ""
    parts.append(
        Part("online options", f"Of the run configuration above, online methods alone read {fields}.{kl}")
    )
    return parts


def _diffusion_part(name: str) -> Part:
    """An online diffusion method's options with its defaults (preftune.diffusion_methods)."""
    from preftune.diffusion_methods import METHODS, OPTIONS

    options = [
        Option(_flags(key), f"{option.help} (default: {option.defaults[name]})")
        for key, option in OPTIONS.items()
        if name in option.defaults
    ]
    return Part(f"online diffusion RL {name}: its options", f"{METHODS[name]}.", options)
