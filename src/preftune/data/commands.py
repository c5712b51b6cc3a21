"""`preftune data check` validates a preference data source before training on it;
`preftune data prepare` tokenizes it into the cache ahead of a run (same options as training);
`preftune data show` prints one example as the model sees it (text, tokens, loss mask);
`preftune data score` scores a pair or completions file with a reward (a reward model folder, ...)."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Any


def register(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `data` (a group with `check`, `prepare` and `show`) to `preftune`."""
    data = sub.add_parser(
        "data",
        help="inspect and validate preference data",
        description="Inspect and validate preference data.",
    )
    data_sub = data.add_subparsers(dest="data_command", metavar="SUBCOMMAND")
    data.set_defaults(func=lambda args: (data.print_help(), 2)[1])
    check = data_sub.add_parser(
        "check",
        help="validate a data file (preference data, an online method's prompts, image pairs) and summarise it",
        description="Check every record of PATH (JSONL, JSON, Parquet, CSV, a datasets folder or a hub id) "
        "the way training does: preference data, the prompt data of an online method (rows with a "
        "'prompt' and extra columns for the reward), or the image preference data of a diffusion "
        "pipeline (detected from image paths, bytes or Pick-a-Pic fields; each image decoded). Lists each problem as PATH:ROW: field 'NAME': what — fix, and "
        "exits 1 if there is any; otherwise prints a summary (with --tokenizer, token-length "
        "percentiles) and exits 0.",
    )
    _common(
        check,
        tokenizer_help="tokenizer or model folder: also format and tokenize, and report "
        "token-length percentiles",
        checks_prompts=True,
    )
    check.add_argument("--max-problems", type=int, default=20, help="problems to print (default 20)")
    check.set_defaults(func=_check)
    prepare = data_sub.add_parser(
        "prepare",
        help="tokenize data into the cache before training",
        description="Validate, format and tokenize PATH exactly as 'preftune train' will with the same "
        "options, and store the result in the tokenized-data cache; prints the summary and the "
        "fingerprint. A later run with the same data, tokenizer and options loads it from the cache.",
    )
    _common(prepare, tokenizer_help="tokenizer or model folder (required)", max_length=1024)
    prepare.add_argument(
        "--on-invalid",
        choices=("error", "drop"),
        default="error",
        help="skip bad rows instead of stopping (default: error)",
    )
    prepare.add_argument(
        "--cache-dir",
        metavar="DIR",
        help="cache folder (default $PREFTUNE_CACHE/tokenized or ~/.cache/preftune/tokenized)",
    )
    prepare.add_argument("--num-proc", type=int, help="tokenizer processes (default 2 above 20k rows)")
    prepare.set_defaults(func=_prepare)
    show = data_sub.add_parser(
        "show",
        help="print one example exactly as the model sees it",
        description="Print row --index of PATH as training would read it: without --tokenizer the "
        "validated record (after layout conversion and --columns); with --tokenizer the rendered "
        "text of the prompt and each response, every token in [brackets] with its id, and the loss "
        "mask (prompt tokens: context, not trained; response tokens: trained). Length limits apply "
        "as in training. Exits 1 if the row is invalid, listing its problems.",
    )
    _common(show, tokenizer_help="tokenizer or model folder: show text, tokens and masks", max_length=1024)
    show.add_argument("--index", type=int, default=0, help="0-based row to show (default 0)")
    show.add_argument(
        "--no-add-eos", dest="add_eos", action="store_false", help="do not append EOS to responses"
    )
    show.set_defaults(func=_show)
    _register_score(data_sub)


def _register_score(data_sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    score = data_sub.add_parser(
        "score",
        help="score pairs or completions with a reward model (or any reward)",
        description="Score PATH with --reward (a reward-model folder, 'arithmetic', module:function, a "
        "weighted sum) and write JSONL to --out. Pair rows (prompt/chosen/rejected) get score_chosen / "
        "score_rejected; with --augment they become reward-augmented pairs (two goal-conditioned pairs "
        "each). Rows with a 'responses' (or 'completions') list become ranked rows, best first with their "
        "scores; with --best, one row per prompt with the best response as 'completion' (best-of-n).",
    )
    score.add_argument("path", metavar="PATH", help="pair or completions file (JSONL, JSON, Parquet, CSV)")
    score.add_argument(
        "--reward", required=True, help="reward spec, e.g. runs/rm/final or 'runs/rm/final:1,arithmetic:2'"
    )
    score.add_argument("--out", required=True, help="output JSONL file")
    score.add_argument("--augment", action="store_true", help="pairs: write reward-augmented pairs")
    score.add_argument("--best", action="store_true", help="completions: keep the best response per prompt")
    score.set_defaults(func=_score)


def _score(args: argparse.Namespace) -> int:
    import json
    from pathlib import Path

    from preftune.reward.data_scoring import score_file
    from preftune.train.logging import quiet_libraries
    from preftune.train.runfolder import write_atomic

    quiet_libraries()
    rows, shape = score_file(args.path, args.reward, augment=args.augment, best=args.best)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(out, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    print(f"scored {shape} of {args.path} with {args.reward}: wrote {len(rows)} rows to {out}")
    return 0


def _common(
    p: argparse.ArgumentParser,
    *,
    tokenizer_help: str,
    max_length: int | None = None,
    checks_prompts: bool = False,
) -> None:
    p.add_argument("path", metavar="PATH", help="data file, datasets folder or hub dataset id")
    p.add_argument(
        "--kind",
        choices=("pairwise", "unpaired", "ranked", "prompts", "steps", "rated")
        if checks_prompts
        else ("pairwise", "unpaired", "ranked"),
        help="record kind (default: detected from the fields"
        + (
            "; prompts: an online method's prompt data, detected when rows have only a prompt and extra "
            "columns; steps: a process reward model's step labels (prompt, steps, labels / first_error / "
            "label); rated: rated responses (prompt, response, rating))"
            if checks_prompts
            else ")"
        ),
    )
    p.add_argument("--tokenizer", metavar="DIR", help=tokenizer_help)
    p.add_argument(
        "--columns", metavar="MAP", help="field=column mapping, e.g. chosen=response_a,rejected=response_b"
    )
    p.add_argument(
        "--split", help="split of a datasets folder or hub id, optionally sliced: train, train[:90%%]"
    )
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template replacing the tokenizer's")
    p.add_argument(
        "--max-length",
        type=int,
        default=max_length,
        help="prompt + response tokens; longer responses lose their end "
        + ("(default 1024, as in training; 0: no limit)" if max_length else "(default: no limit)"),
    )
    p.add_argument("--max-prompt-length", type=int, help="prompt tokens; longer prompts lose their start")
    p.add_argument(
        "--max-completion-length", type=int, help="tokens of each response; longer ones lose their end"
    )
    p.add_argument(
        "--truncation",
        choices=("truncate", "drop"),
        default="truncate",
        help="a row over a limit: truncate it (the prompt keeps its end, responses their start) "
        "or drop it (default: truncate)",
    )


def _check(args: argparse.Namespace) -> int:
    from preftune.data.schema import detect_kind, normalize
    from preftune.data.sources import read_source
    from preftune.data.validate import check_data, format_check
    from preftune.diffusion.imagedata import looks_like_images
    from preftune.reward.data_check import looks_like_ratings, looks_like_steps

    if args.kind == "prompts":
        return _check_prompts(args)
    data = read_source(args.path, split=args.split)  # read once: the probes below see its first record
    first: dict[str, Any] = next((r for _, r in data.rows if r is not None), {})
    detect = args.kind is None and not args.columns
    if detect and looks_like_images(first):  # a diffusion pipeline's image preference data
        return _check_images(args, data)
    if args.kind in ("steps", "rated") or (detect and (looks_like_steps(first) or looks_like_ratings(first))):
        kind = (
            args.kind if args.kind in ("steps", "rated") else "steps" if looks_like_steps(first) else "rated"
        )
        return _check_reward_data(args, data, kind)
    result = check_data(
        data,
        kind=args.kind,
        columns=args.columns,
        tokenizer=args.tokenizer,
        chat_template=args.chat_template,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        truncation=args.truncation,
    )
    # no preference kind fits and the rows have a `prompt`, nothing else of preference data: an
    # online method's prompt data (`preftune train grpo --prompts PATH`)
    if (
        result.summary["kind"] is None
        and detect
        and "prompt" in first
        and detect_kind(normalize(first)[0]) is None
    ):
        return _check_prompts(args)
    print(format_check(result, args.max_problems))
    return 0 if result.ok else 1


def _check_images(args: argparse.Namespace, data: Any) -> int:
    """`data check` of image preference data: every row read as `preftune train METHOD --model
    PIPELINE_FOLDER` reads it, each image decoded; problems as PATH:ROW: field 'NAME', else a summary."""
    from preftune.diffusion.imagedata import check_image_file

    records, summary, problems = check_image_file(args.path, data)
    if problems:
        shown = problems[: args.max_problems]
        more = len(problems) - len(shown)
        print("\n".join([*shown, *([f"... and {more} more"] if more else [])]))
        print(f"{args.path}: {len(problems)} problem(s) in image preference data (docs/diffusion.md, 'Data')")
        return 1
    formats = ", ".join(f"{name} {n}" for name, n in sorted(summary["formats"].items()))
    sizes = ", ".join(f"{size} ×{n}" for size, n in sorted(summary["sizes"].items(), key=lambda kv: -kv[1]))
    kinds = " + ".join(sorted({r.kind for r in records})) or "none"
    print(
        f"{args.path}: OK — {len(records)} rows of image preference data, {kinds} (formats: {formats or 'none'}); "
        f"{summary['ties']} ties dropped; images: {sizes or 'none'}"
    )
    return 0


def _check_reward_data(args: argparse.Namespace, data: Any, kind: str) -> int:
    """`data check` of step labels (kind steps) or ratings (kind rated): each row as training reads it."""
    from preftune.data.rows import render_problems
    from preftune.reward.data_check import check_ratings, check_steps

    problems, summary = (check_steps if kind == "steps" else check_ratings)(data)
    if problems:
        what = (
            "step-labelled data (preftune train prm)"
            if kind == "steps"
            else "rating data (--loss regression)"
        )
        print(render_problems(problems, args.max_problems))
        print(f"{args.path}: {len(problems)} problem(s) in {what} (docs/reward_models.md) — fix the file")
        return 1
    print(summary)
    return 0


def _check_prompts(args: argparse.Namespace) -> int:
    """`data check` of prompt data: every row checked as the online loop reads it (with --tokenizer,
    formatted and tokenized too); problems as PATH:ROW: field 'prompt', else a summary."""
    from preftune.data.formatting import load_tokenizer
    from preftune.data.validate import token_lengths, token_table
    from preftune.errors import DataError
    from preftune.rl.prompts import _FIX, _problem, checked_prompt_rows, load_prompts

    try:
        if args.tokenizer:
            tokenizer = load_tokenizer(args.tokenizer)
            rows = load_prompts(
                args.path,
                tokenizer,
                split=args.split,
                chat_template=args.chat_template,
                max_prompt_length=args.max_prompt_length,
            )
            records = [{"prompt": r.text, **r.columns} for r in rows]
            lengths = [len(r.ids) for r in rows]
        else:
            _path, good = checked_prompt_rows(args.path, _problem, _FIX, split=args.split)
            records, lengths = [rec for _, rec in good], []
    except DataError as err:
        print(f"{err}\n{args.path}: prompt data of an online method — fix the file")
        return 1
    columns = sorted({k for rec in records for k in rec if k != "prompt"})
    chat = sum(isinstance(rec["prompt"], list) for rec in records)
    print(
        f"{args.path}: OK — {len(records)} prompts ({chat} message lists), kind prompts (an online "
        f"method's --prompts); columns passed to the reward: {', '.join(columns) or 'none'}"
    )
    if lengths:
        print("\n".join(token_table({"prompt": token_lengths(lengths)})))
    return 0


def _prepare(args: argparse.Namespace) -> int:
    import json

    from preftune.data.pipeline import prepare_examples
    from preftune.data.validate import format_summary
    from preftune.errors import ConfigError

    if not args.tokenizer:
        raise ConfigError("preftune data prepare needs --tokenizer DIR (the model's tokenizer)")
    notices = _Collect()  # the pipeline's own notices: printed below, the summary only once
    data_log = logging.getLogger("preftune.data")
    data_log.addHandler(notices)
    data_log.propagate, propagate = False, data_log.propagate
    try:
        out = _run_prepare(args, prepare_examples)
    finally:
        data_log.removeHandler(notices)
        data_log.propagate = propagate
    summary = format_summary(out.summary)
    for message in notices.messages:
        if message != summary:
            print(message, file=sys.stderr)
    print(summary)
    print(json.dumps({"fingerprint": out.fingerprint, "cache_file": out.summary.get("cache_file")}))
    return 0


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


def _run_prepare(args: argparse.Namespace, prepare_examples: Any) -> Any:
    return prepare_examples(
        args.path,
        tokenizer=args.tokenizer,
        kind=args.kind,
        columns=args.columns,
        split=args.split,
        chat_template=args.chat_template,
        max_length=args.max_length,
        max_prompt_length=args.max_prompt_length,
        max_completion_length=args.max_completion_length,
        truncation=args.truncation,
        on_invalid=args.on_invalid,
        cache_dir=args.cache_dir,
        num_proc=args.num_proc,
    )


def _show(args: argparse.Namespace) -> int:
    from preftune.data.lengths import Truncation
    from preftune.data.show import show_example

    text, ok = show_example(
        args.path,
        index=args.index,
        tokenizer=args.tokenizer,
        kind=args.kind,
        columns=args.columns,
        split=args.split,
        chat_template=args.chat_template,
        trunc=Truncation(
            args.max_length or None,
            args.max_prompt_length or None,
            args.max_completion_length or None,
            args.truncation,
        ),
        add_eos=args.add_eos,
    )
    print(text)
    return 0 if ok else 1
