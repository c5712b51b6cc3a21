"""The option groups of `preftune eval` (and the KL flags `preftune sweep` shares): how the held-out
--data is read (--kind, --columns, --on-invalid: training's own config fields and flags, defaulting to
the run's), best-of-n of a reward-model run, held-out prompts, and the sampled KL to the reference.

Kept free of heavy imports: the parsers are built for every `preftune` command line.
"""

from __future__ import annotations

import argparse
from typing import Any

from preftune.cli import int_at_least, temperature_arg

# The config fields that say how a data file is read, as `preftune train` reads --data and --eval-data.
HELDOUT_DATA_FIELDS = ("kind", "columns", "on_invalid")


def add_heldout_data_flags(p: argparse.ArgumentParser) -> None:
    """--kind, --columns and --on-invalid, defined by `preftune train`'s own flag builder."""
    from preftune.train.commands import _add_field

    g = p.add_argument_group(
        "reading --data (as 'preftune train' reads its data; each defaults to the run's config.yaml)"
    )
    for name in HELDOUT_DATA_FIELDS:
        _add_field(g, name, default_text="the run's")


def heldout_data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The held-out data options given on the command line (config key → value), to override the run's."""
    return {name: getattr(args, name) for name in HELDOUT_DATA_FIELDS if hasattr(args, name)}


def add_best_of_n_flags(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("best-of-n (a reward-model run)")
    g.add_argument("--best-of-n", type=int_at_least(0), default=0, metavar="N",
                   help="sample N completions per prompt of --prompts and report the gold reward of the "
                   "RM's pick among n = 1, 2, 4, ..., N (and of the best one, the oracle)")  # fmt: skip
    g.add_argument("--gold", default="arithmetic", help="gold reward spec (default: the task's verifier)")
    g.add_argument("--policy", help="model to sample (default: the run's --model)")
    h = p.add_argument_group(
        "held-out prompts (--prompts): best-of-n of a reward-model run, or a policy run's held-out reward: "
        "final/'s responses and the starting model's to the same prompts, scored by --reward"
    )
    h.add_argument("--prompts", help="prompt rows ('prompt' and the columns the reward reads)")
    h.add_argument(
        "--reward", help="a policy run's reward for --prompts (default: the run's --reward, else arithmetic)"
    )
    h.add_argument(
        "--num-samples",
        type=int_at_least(1),
        default=1,
        help="a policy run's responses per prompt (default 1: greedy)",
    )
    h.add_argument(
        "--temperature",
        type=temperature_arg,
        default=None,
        help="sampling temperature (default: 0, greedy, for a policy run; 1 for best-of-n)",
    )
    h.add_argument(
        "--max-new-tokens",
        type=int_at_least(1),
        default=None,
        help="longest response (default: the run's max_completion_length, else 128)",
    )
    h.add_argument("--seed", type=int, default=0, help="sampling seed (default 0)")


def add_kl_flags(p: argparse.ArgumentParser, default_samples: int) -> None:
    g = p.add_argument_group("KL to the reference (sampled from the policy at temperature 1)")
    g.add_argument(
        "--kl-samples",
        type=int_at_least(0),
        default=default_samples,
        metavar="N",
        help=f"responses sampled per held-out prompt (0: skip the KL estimate; default {default_samples})",
    )
    g.add_argument(
        "--kl-prompts",
        type=int_at_least(1),
        default=32,
        metavar="N",
        help="held-out prompts used (default 32)",
    )
    g.add_argument(
        "--kl-max-new-tokens",
        type=int_at_least(1),
        default=64,
        metavar="N",
        help="longest sampled response; longer ones are cut, which lowers the estimate (default 64)",
    )
