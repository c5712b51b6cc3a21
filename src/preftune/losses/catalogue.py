"""Every method name `preftune train METHOD` takes beyond the offline preference losses, by family —
online RL presets, distillation, reward models, online diffusion RL — for `preftune losses`.

Each entry is read from the registry that trains it (`preftune.online_methods.PRESETS`,
`DISTILL_LOSSES`, the reward-model losses, `preftune.diffusion_methods`), so the listing cannot drift
from what `preftune train` accepts.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from preftune.losses.docs import method_section


@dataclass(frozen=True)
class Entry:
    """One trainable method: its family, what it expands to (one line) and its paper."""

    name: str
    family: str
    summary: str
    paper: str


# family → (label, title, how a method of it is run, where it is documented)
FAMILIES: dict[str, tuple[str, str, str, str]] = {
    "online": (
        "online RL",
        "Online RL from rewards: samples its own responses to --prompts, scored by --reward",
        "preftune train NAME --model M --prompts P.jsonl --reward R --out O",
        "docs/online.md",
    ),
    "distillation": (
        "distillation",
        "Distillation from a DPO teacher on preference pairs",
        "preftune train NAME --model STUDENT --teacher T [--teacher-ref T_REF] --data PAIRS --out O",
        "docs/online.md, Distillation",
    ),
    "reward_model": (
        "reward model",
        "Reward models and process reward models (--loss picks the loss)",
        "preftune train rm|prm --model M --data D --loss L --out O",
        "docs/reward_models.md",
    ),
    "diffusion_rl": (
        "online diffusion RL",
        "Online RL of diffusion pipelines: the sampler is the policy",
        "preftune train NAME --model PIPELINE_FOLDER --prompts P.jsonl --reward R --out O",
        "docs/diffusion.md",
    ),
}


def _online_summary(name: str) -> str:
    from preftune.online_methods import PRESETS

    p = PRESETS[name]
    if p.builder:
        parts = [f"builder {p.builder} → {p.objective}"]
    else:
        parts = [f"estimator {p.estimator}", f"objective {p.objective}"]
    parts += [f"sampler {p.sampler}"] if p.sampler != "uniform" else []
    parts += [f"macro {p.macro}"] if p.macro else []
    return ", ".join(parts)


def entries() -> list[Entry]:
    """Every method of the families above, each family in name order."""
    from preftune import diffusion_methods
    from preftune.losses.distill_losses import DISTILL_LOSSES
    from preftune.method_checks import DISTILL_METHODS
    from preftune.online_methods import PRESETS
    from preftune.reward.losses import PAIR_LOSSES, RATING_LOSSES
    from preftune.reward.prm import PRM_LOSSES

    out = [Entry(n, "online", _online_summary(n), PRESETS[n].paper) for n in sorted(PRESETS)]
    out += [
        Entry(n, "distillation", DISTILL_LOSSES[n].equation, DISTILL_LOSSES[n].paper)
        for n in sorted(DISTILL_METHODS)
    ]
    rm_losses = ", ".join([*PAIR_LOSSES, *RATING_LOSSES])
    out += [
        Entry(
            "rm",
            "reward_model",
            f"a scalar reward head; --loss {rm_losses}",
            "Ouyang et al. 2022, §3.5 (Bradley–Terry)",
        ),
        Entry(
            "prm",
            "reward_model",
            f"step scores; --loss {', '.join(PRM_LOSSES)}",
            "Wang et al. 2024, Math-Shepherd; Setlur et al. 2024, PAV",
        ),
    ]
    out += [
        Entry(n, "diffusion_rl", text.partition(": ")[2], text.partition(": ")[0])
        for n, text in sorted(diffusion_methods.METHODS.items())
    ]
    return out


def short_paper(entry: Entry) -> str:
    """Authors, year and the method's name (the first two comma-separated parts, no remarks in
    parentheses), for tables."""
    return ",".join(entry.paper.split(" (")[0].split(",")[:2]).strip()


def find(name: str) -> Entry | None:
    """The entry called `name`, or None (an offline loss, or unknown)."""
    return next((e for e in entries() if e.name == name.strip()), None)


def unknown_method(name: str) -> str:
    """The error for a method name no family has: the closest name of any family, and the list."""
    from difflib import get_close_matches

    from preftune import losses

    names = sorted([*losses.REGISTRY, *(e.name for e in entries())])
    close = get_close_matches(name, names, n=1)
    hint = f" — did you mean '{close[0]}'?" if close else ""
    return f"unknown method '{name}'{hint} (run 'preftune losses' to list them: {', '.join(names)})"


def detail(entry: Entry) -> str:
    """Markdown for `preftune losses NAME`: how to run the method, what it expands to, its options."""
    label, _title, run, doc = FAMILIES[entry.family]
    head = [
        f"# `{entry.name}` — {label}",
        "",
        f"- **paper**: {entry.paper}",
        f"- **run**: `{run.replace('NAME', entry.name).replace('rm|prm', entry.name)}` ({doc})",
        f"- **what**: {entry.summary}",
        "",
    ]
    body = {
        "online": _online_detail,
        "distillation": _distill_detail,
        "reward_model": _reward_detail,
        "diffusion_rl": _diffusion_detail,
    }[entry.family](entry.name)
    return "\n".join(head + body)


def _online_detail(name: str) -> list[str]:
    from preftune.losses import REGISTRY
    from preftune.losses.policy_losses import POLICY_LOSSES
    from preftune.losses.registry import parse_objective
    from preftune.online_methods import PRESETS, preset_sampler
    from preftune.rl.builders import BUILDERS
    from preftune.rl.registry import REGISTRY as ESTIMATORS
    from preftune.rl.samplers import SAMPLERS

    p = PRESETS[name]
    lines = []
    if p.estimator in ESTIMATORS:
        est = ESTIMATORS[p.estimator]
        text = " ".join(inspect.cleandoc(est.fn.__doc__ or "").split("\n\n")[0].split())
        lines.append(f"- **advantage estimator** `{est.name}` (`--estimator`): {text} ({est.paper})")
        if p.estimator == "gae":  # the PPO family reads config fields (rl.ppo.token_credit)
            lines += ["", *_ppo_fields_table(name), ""]
        elif est.hparams:
            lines += ["", *_options_table(est.hparams, "estimator option"), ""]
    sampler = SAMPLERS[p.sampler]
    lines.append(f"- **sampler** `{sampler.name}` (`--sampler`): {sampler.rule.split(';')[0]}")
    if sampler.hparams:
        defaults = preset_sampler(name, None, None)[1]
        table = _options_table(sampler.hparams, "`--sampler-args` key", defaults, flags=False)
        lines += ["", *table, ""]
    if p.builder:
        builder = BUILDERS[p.builder]
        lines.append(
            f"- **builder** `{builder.name}` ({builder.paper}): turns each step's scored samples into {builder.kind} examples"
        )
        for key, hp in builder.hparams.items():
            lines.append(f"  - `--{key.replace('_', '-')}` (default {hp.default}): {hp.doc}")
    if p.hparams:
        lines.append(f"- **preset values**: {', '.join(f'{k}={v}' for k, v in p.hparams.items())}")
    registry = REGISTRY if p.builder else POLICY_LOSSES
    lines += [f"- **objective** `{p.objective}` (`--objective`), its terms:", ""]
    for spec, _weight in parse_objective(p.objective, registry):
        lines.append(method_section(spec).replace("## ", "### ", 1))
    return lines


def _options_table(
    hparams: Mapping[str, Any], what: str, defaults: Mapping[str, Any] | None = None, flags: bool = True
) -> list[str]:
    """A Markdown table of options (`HParam`s) with their defaults (`defaults` overrides), valid values
    and meaning; `flags`: each named as its `--flag`, else as a bare key."""
    from preftune.losses.docs import cell, default_text

    rows = [f"| {what} | default | valid | meaning |", "|---|---|---|---|"]
    for key, hp in hparams.items():
        shown = f"--{key.replace('_', '-')}" if flags else key
        hp = replace(hp, default=defaults[key]) if defaults and key in defaults else hp
        value = "—" if hp.default is None else default_text(hp)
        rows.append(f"| `{shown}` | {value} | {cell(hp.range_text())} | {cell(hp.doc)} |")
    return rows


def _ppo_fields_table(method: str) -> list[str]:
    """The PPO family's options (`config_fields.ppo_only_fields`: GAE's γ and λ, the KL penalty, the
    value head's learning rate, MA-RLHF's and RTO's), with the preset's defaults."""
    from preftune.config_fields import FIELDS, field_type, ppo_only_fields
    from preftune.losses.registry import HParam
    from preftune.online_methods import PRESETS

    preset = PRESETS[method]
    types = {int: "int", float: "float", str: "str"}
    options = {}
    for name in ppo_only_fields():
        meta, base = FIELDS[name].metadata, field_type(name)[0]
        bounds = {k: meta[k] for k in ("low", "high", "choices", "low_open", "high_open") if k in meta}
        default = {"kl_coef": preset.kl_coef, "macro": preset.macro}.get(name, FIELDS[name].default)
        options[name] = HParam(default, str(meta["help"]), type=types.get(base), **bounds)  # type: ignore[arg-type]
    return _options_table(options, "PPO option")


def _distill_detail(name: str) -> list[str]:
    from preftune.losses.distill_losses import DISTILL_LOSSES

    return [method_section(DISTILL_LOSSES[name]).replace("## ", "### ", 1)]


def _reward_detail(name: str) -> list[str]:
    from preftune.reward.losses import PAIR_LOSSES, RATING_LOSSES
    from preftune.reward.prm import PRM_LOSSES

    table = {**PAIR_LOSSES, **RATING_LOSSES} if name == "rm" else PRM_LOSSES
    lines = ["| `--loss` | what it fits |", "|---|---|"]
    for key, fn in table.items():
        doc = " ".join((fn.__doc__ or "").split())
        lines.append(f"| `{key}` | {doc.replace('|', chr(92) + '|')} |")
    return lines


def _diffusion_detail(name: str) -> list[str]:
    from preftune.diffusion_methods import OPTIONS

    lines = ["| option | default | meaning |", "|---|---|---|"]
    for key, option in OPTIONS.items():
        if name in option.defaults:
            lines.append(f"| `--{key.replace('_', '-')}` | {option.defaults[name]} | {option.help} |")
    return lines
