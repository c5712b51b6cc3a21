"""`preftune losses`: list the registered losses with their data kind, reference, hyper-parameters
and paper; `preftune losses NAME` shows one method's formula, defaults and deviations."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this package's subcommands to `preftune`."""
    parser = sub.add_parser(
        "losses",
        help="list the registered losses (methods), their hyper-parameters and papers",
        description="List every registered loss: data kind, whether it needs a reference model, "
        "hyper-parameters with defaults, and the paper. Give a NAME for the method's details "
        "(formula, equation, ranges, deviations from the paper).",
    )
    parser.add_argument("name", nargs="?", help="show one method in detail (formula, ranges, deviations)")
    parser.add_argument(
        "--compact",
        action="store_true",
        help="one plain line per method (name, data kind, reference, hyper-parameters): fits 80 columns",
    )
    parser.set_defaults(func=run)


def compact_lines() -> list[str]:
    """One line per method: name, data kind, reference yes/no, hyper-parameters with defaults."""
    from preftune import losses
    from preftune.losses.docs import hparam_summary

    width = max(len(n) for n in losses.REGISTRY)
    lines = [f"{'method':<{width}}  {'data':<8}  ref  hyper-parameters (defaults)"]
    for name in sorted(losses.REGISTRY):
        spec = losses.REGISTRY[name]
        ref = "yes" if spec.needs_reference else "no"
        lines.append(f"{name:<{width}}  {spec.kind:<8}  {ref:<3}  {hparam_summary(spec)}")
    return lines


def run(args: argparse.Namespace) -> int:
    from rich import box
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.table import Table

    from preftune import losses
    from preftune.losses.docs import hparam_summary, method_section, short_paper

    console = Console()
    if args.name:
        console.print(Markdown(method_section(losses.get(args.name))))
        return 0
    if args.compact:
        print("\n".join(compact_lines()))
        return 0
    table = Table(title="preftune losses", show_lines=False, box=box.SIMPLE_HEAD, pad_edge=False)
    for column in ("name", "data", "ref", "hyper-parameters (defaults)", "paper"):
        table.add_column(column, overflow="fold", no_wrap=column != "paper")
    for name in sorted(losses.REGISTRY):
        spec = losses.REGISTRY[name]
        ref = "yes" if spec.needs_reference else "no"
        # one hyper-parameter per line: a narrow column wraps between them, not inside a name
        table.add_row(name, spec.kind, ref, hparam_summary(spec).replace(", ", "\n"), short_paper(spec))
    console.print(table)
    console.print(
        "Details (formula, equation, deviations): preftune losses NAME · narrow terminal: --compact · "
        "objectives combine terms, e.g. dpo:1.0,sft:0.2"
    )
    return 0
