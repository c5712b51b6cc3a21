"""The `preftune` command line: a thin layer that parses arguments and calls the library.

Each command lives with the code it drives; a module listed in `COMMAND_MODULES` exposes
`register(subparsers)`, which adds its parsers and sets `func(args) -> int` on each. Heavy imports
(torch, transformers) happen inside those functions, so `preftune --help` stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable

from preftune import __version__
from preftune.errors import PreftuneError

COMMAND_MODULES: tuple[str, ...] = (
    "preftune.train.commands",  # train
    "preftune.eval.commands",  # eval, report, sweep
    "preftune.tasks.commands",  # quickstart
    "preftune.data.commands",  # data check
    "preftune.sample_commands",  # sample (diffusion pipelines)
)

# Commands whose module sits in a package that imports torch when imported (preftune.losses): their
# parser is registered only when the command line names them; otherwise a stub with the help line.
DEFERRED: dict[str, tuple[str, str]] = {
    "losses": (
        "preftune.losses.commands",
        "list every method (losses, online RL, distillation, reward models), its knobs and paper",
    ),
}


def int_at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer ≥ `low` (a bad value is argparse's one-line usage error)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"'{text}' is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be ≥ {low}, got {value}")
        return value

    return parse


def temperature_arg(text: str) -> float:
    """An argparse type: a sampling temperature, a finite number ≥ 0 (0: greedy)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not value >= 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number ≥ 0 (0: greedy), got {text}")
    return value


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The `preftune` parser. `argv`: the command line it will parse, so that a deferred command's
    own parser is registered only when it runs (`preftune --help` imports no torch)."""
    parser = argparse.ArgumentParser(
        prog="preftune",
        description="Align generative models with preference and reward feedback: the DPO family "
        "and other offline preference losses, reward models and process reward models, online RL "
        "from rewards (GRPO, RLOO, PPO, online DPO, ...), distillation, and diffusion-model "
        "alignment (Diffusion-DPO and its family, DDPO, DPOK, SPO, AWM) — trained and evaluated "
        "from the command line or Python.",
        epilog="Run 'preftune COMMAND --help' for the options of a command. "
        "Start with 'preftune quickstart' for the built-in end-to-end demo.",
    )
    parser.add_argument("--version", action="version", version=f"preftune {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    command = next((a for a in argv or [] if not a.startswith("-")), None)
    for name, (module, help_text) in DEFERRED.items():
        if command == name:
            importlib.import_module(module).register(sub)
        else:
            sub.add_parser(name, help=help_text)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    args.argv = argv  # the command line as given: a stopped sweep prints it back with --resume
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
