"""The `preftune` command line: a thin layer that parses arguments and calls the library.

Each command lives with the code it drives; a module listed in `COMMAND_MODULES` exposes
`register(subparsers)`, which adds its parsers and sets `func(args) -> int` on each. Heavy imports
(torch, transformers) happen inside those functions, so `preftune --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from preftune import __version__
from preftune.errors import PreftuneError

COMMAND_MODULES: tuple[str, ...] = (
    "preftune.train.commands",  # train
    "preftune.eval.commands",  # eval, report, sweep
    "preftune.tasks.commands",  # quickstart
    "preftune.data.commands",  # data check
    "preftune.losses.commands",  # losses
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="preftune",
        description="Align generative models with preference and reward feedback "
        "(DPO and its family, reward models, online RL).",
        epilog="Run 'preftune COMMAND --help' for the options of a command. "
        "Start with 'preftune quickstart' for the built-in end-to-end demo.",
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except PreftuneError as err:
        print(f"preftune: error: {err}", file=sys.stderr)
        return int(getattr(err, "exit_code", 2))  # a run stopped by a signal: 128 + its number
    except KeyboardInterrupt:
        print("preftune: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
