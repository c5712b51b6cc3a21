"""`preftune losses`: list the registered losses with their data kind, reference, hyper-parameters
and paper, then every other method `preftune train` takes (online RL, distillation, reward models,
online diffusion RL: `preftune.losses.catalogue`); `preftune losses NAME` shows one method's formula,
defaults and deviations, or what an online preset expands to and how to run it."""

from __future__ import annotations

import argparse
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this package's subcommands to `preftune`."""
    parser = sub.add_parser(
        "losses",
        help=HELP,
        description="List every method of `preftune train`: the offline preference losses (data kind, "
        "whether it needs a reference model, hyper-parameters with defaults, paper), then the online "
        "RL presets, distillation, reward models and online diffusion RL, each with how it is run. "
        "Give a NAME for one method's details (formula, equation, ranges, deviations from the paper; "
        "for an online preset its estimator, sampler and objective terms).",
    )
    parser.add_argument("name", nargs="?", help="show one method in detail (e.g. dpo, grpo, adpa, rm, ddpo)")
    parser.add_argument(
        "--compact",
        action="store_true",
        help="one plain line per method (name, data kind, reference, hyper-parameters): fits 80 columns",
    )
    parser.set_defaults(func=run)


OFFLINE_TITLE = "Offline preference losses, on --data (text pairs, or image pairs on a pipeline folder)"
OFFLINE_RUN = "preftune train NAME --model M --data D --out O  (docs/methods.md)"
HELP = "list every method (losses, online RL, distillation, reward models), its knobs and paper"


def compact_lines() -> list[str]:
    """One line per offline loss (name, data kind, reference yes/no, hyper-parameters with defaults),
    then one per other method (name, family, what it expands to)."""
    from preftune import losses
    from preftune.losses.catalogue import entries
    from preftune.losses.docs import hparam_summary

    others = entries()
    width = max(len(n) for n in losses.REGISTRY)
    lines = [f"{'method':<{width}}  {'data':<8}  ref  hyper-parameters (defaults)"]
    for name in sorted(losses.REGISTRY):
        spec = losses.REGISTRY[name]
        ref = "yes" if spec.needs_reference else "no"
        lines.append(f"{name:<{width}}  {spec.kind:<8}  {ref:<3}  {hparam_summary(spec)}")
    width = max(len(e.name) for e in others)
    lines.append(f"{'method':<{width}}  {'family':<12}  what (details: preftune losses NAME)")
    for e in others:
        line = f"{e.name:<{width}}  {e.family:<12}  {e.summary}"
        lines.append(line if len(line) <= 80 else line[:79] + "…")
    return lines


def run(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.table import Table

    from preftune import losses
    from preftune.errors import ConfigError
    from preftune.losses.catalogue import detail, find, unknown_method
    from preftune.losses.docs import hparam_summary, method_section, short_paper

    console = Console()
    if args.name:
        entry = find(args.name)
        if entry is None and args.name.strip() not in losses.REGISTRY:
            raise ConfigError(unknown_method(args.name.strip()))
        text = detail(entry) if entry else method_section(losses.get(args.name))
        console.print(Markdown(text))
        return 0
    if args.compact:
        print("\n".join(compact_lines()))
        return 0
    table = Table(
        title=OFFLINE_TITLE, caption=OFFLINE_RUN, show_lines=False, box=box.SIMPLE_HEAD, pad_edge=False
    )
    for column in ("name", "data", "ref", "hyper-parameters (defaults)", "paper"):
        table.add_column(column, overflow="fold", no_wrap=column != "paper")
    for name in sorted(losses.REGISTRY):
        spec = losses.REGISTRY[name]
        ref = "yes" if spec.needs_reference else "no"
        # one hyper-parameter per line: a narrow column wraps between them, not inside a name
        table.add_row(name, spec.kind, ref, hparam_summary(spec).replace(", ", "\n"), short_paper(spec))
    console.print(table)
    _print_families(console)
    console.print(
        "Details (formula, equation, deviations): preftune losses NAME · narrow terminal: --compact · "
        "objectives combine terms, e.g. dpo:1.0,sft:0.2"
    )
    return 0


def _print_families(console: Any) -> None:
    """One table per family of the catalogue, under its title and the command that runs it."""
    from rich import box
    from rich.table import Table

    from preftune.losses.catalogue import FAMILIES, entries, short_paper

    for family, (_label, title, run, doc) in FAMILIES.items():
        table = Table(title=title, caption=f"{run}  ({doc})", box=box.SIMPLE_HEAD, pad_edge=False)
        for column in ("name", "what", "paper"):
            table.add_column(column, overflow="fold", no_wrap=column == "name")
        for e in entries():
            if e.family == family:
                table.add_row(e.name, e.summary, short_paper(e))
        console.print(table)
