"""CLI commands of the eval package: `preftune report`, `preftune eval`, `preftune sweep`.

Heavy imports (torch, matplotlib, transformers) happen inside the command functions so that
`preftune --help` stays fast.
"""

from __future__ import annotations

import argparse


def _report(args: argparse.Namespace) -> int:
    from preftune.eval.report import write_report

    path = write_report(args.run_dir)
    print(f"wrote {path}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add this package's subcommands to `preftune`."""
    p = sub.add_parser(
        "report",
        help="regenerate a run's HTML report (RUN/report.html) from its logs",
        description="Rebuild RUN_DIR/report.html from RUN_DIR/metrics.jsonl, summary.json and "
        "config.yaml: one self-contained HTML file with plots of every logged metric.",
    )
    p.add_argument("run_dir", metavar="RUN_DIR", help="folder of a training run (holds metrics.jsonl)")
    p.set_defaults(func=_report)
