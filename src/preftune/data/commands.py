"""`preftune data check`: validate a preference data source before training on it."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `data` (a group with `check`) to `preftune`."""
    data = sub.add_parser(
        "data",
        help="inspect and validate preference data",
        description="Inspect and validate preference data.",
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])
    check = data_sub.add_parser(
        "check",
        help="validate a data file and summarise it",
        description="Check every record of PATH (JSONL, JSON, Parquet, CSV, a datasets folder or a hub id) "
        "the way training does. Lists each problem as PATH:ROW: field 'NAME': what — fix, and "
        "exits 1 if there is any; otherwise prints a summary (with --tokenizer, token-length "
        "percentiles) and exits 0.",
    )
    check.add_argument("path", metavar="PATH", help="data file, datasets folder or hub dataset id")
    check.add_argument(
        "--kind",
        choices=("pairwise", "unpaired", "ranked"),
        help="record kind (default: detected from the fields)",
    )
    check.add_argument(
        "--tokenizer",
        metavar="DIR",
        help="tokenizer or model folder: also format and tokenize, and report token-length percentiles",
    )
    check.add_argument(
        "--columns", metavar="MAP", help="field=column mapping, e.g. chosen=response_a,rejected=response_b"
    )
    check.add_argument(
        "--split", help="split of a datasets folder or hub id, optionally sliced: train, train[:90%%]"
    )
    check.add_argument(
        "--chat-template", metavar="FILE", help="Jinja chat template replacing the tokenizer's"
    )
    check.add_argument(
        "--max-length", type=int, help="count rows truncated/dropped at this prompt+response length"
    )
    check.add_argument("--max-prompt-length", type=int, help="count prompts truncated at this length")
    check.add_argument("--max-problems", type=int, default=20, help="problems to print (default 20)")
    check.set_defaults(func=_check)


def _check(args: argparse.Namespace) -> int:
    from preftune.data.validate import check_data, format_check

    result = check_data(
        args.path,
        kind=args.kind,
        columns=args.columns,
        split=args.split,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
    )
    print(format_check(result, args.max_problems))
    return 0 if result.ok else 1
