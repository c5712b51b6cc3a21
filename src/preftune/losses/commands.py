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
        "hyper-parameters with defaults, and the paper. Give a NAME for the method's details.",
    )
    parser.add_argument("name", nargs="?", help="show one method in detail (formula, ranges, deviations)")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.markdown import Markdown
    from rich.table import Table

    from preftune import losses
    from preftune.losses.docs import hparam_summary, method_section

    console = Console()
    if args.name:
        console.print(Markdown(method_section(losses.get(args.name))))
        return 0
    table = Table(title="preftune losses", show_lines=False)
    for column in ("name", "kind", "reference?", "hyper-parameters (defaults)", "paper"):
        table.add_column(column, overflow="fold")
    for name in sorted(losses.REGISTRY):
        spec = losses.REGISTRY[name]
        table.add_row(
            name,
            spec.kind,
            "yes" if spec.needs_reference else "no",
            hparam_summary(spec),
            f"{spec.paper} — {spec.equation}",
        )
    console.print(table)
    console.print("Details: preftune losses NAME · objectives combine terms, e.g. dpo:1.0,sft:0.2")
    return 0
