"""One call from a data source to tokenized `Example`s: read → validate → format → tokenize → cache.

    prepared = prepare_examples("prefs.jsonl", tokenizer="./sft-model", max_length=1024)
    prepared.examples      # list[Example]
    prepared.summary       # rows, examples, dropped, truncated, reasons, cache ("hit" | "miss" | ...)

The cache key (`fingerprint`) covers the data's bytes, the split and column mapping, the kind, the
tokenizer (vocabulary, merges, special tokens, chat template), the formatting and truncation options
and the code of this package's data layer; any change gives a new key, so a stale cache is never
read. A second run with the same key skips reading, validation and tokenization.
"""

from __future__ import annotations

import functools
import gc
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from preftune.data import cache as cache_io
from preftune.data.formatting import (
    FormatOptions,
    Formatter,
    load_tokenizer,
    read_template,
    tokenizer_fingerprint,
)
from preftune.data.layouts import parse_columns
from preftune.data.lengths import Truncation
from preftune.data.rows import Problem, SourceData, render_problems
from preftune.data.schema import Record, validate
from preftune.data.sources import content_hash, read_source
from preftune.data.tokenize import Tokenized, TokenizeResult, tokenize_records
from preftune.data.validate import check_positions, format_summary
from preftune.errors import ConfigError, DataError
from preftune.types import Example, Kind

log = logging.getLogger("preftune.data")

RANKED_PAIRS = ("best_vs_worst", "best_vs_each", "all_pairs")
ON_INVALID = ("error", "drop")
SHOWN_PROBLEMS = 20
CACHE_FORMAT = 1


@dataclass
class PreparedData:
    """Tokenized examples ready for batching.

    examples:    one Example per kept row (or per built pair when ranked_pairs is set).
    fingerprint: the cache key of the tokenized data (also a key for reference caches).
    summary:     rows, kind, examples, dropped, reasons {why: count}, truncated (rows),
                 truncated_prompt, truncated_response, tokens, cache, seconds.
    """

    examples: list[Example]
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)


def ranked_to_pairs(example: Example, how: str) -> list[Example]:
    """Pairs (chosen, rejected) from a ranked example (responses best first, scores descending).

    best_vs_worst: (1st, last); best_vs_each: (1st, j) for every j; all_pairs: (i, j) for all i < j
    (Curry-DPO style). Tied scores make no pair. Each pair shares the prompt ids and carries
    scores [s_chosen, s_rejected] and meta["ranks"] = (i, j).
    """
    if how not in RANKED_PAIRS:
        raise ConfigError(f"ranked_pairs='{how}' — use one of {', '.join(RANKED_PAIRS)}")
    scores = example.scores or []
    k = len(example.response_ids)
    if how == "best_vs_worst":
        idx = [(0, k - 1)]
    elif how == "best_vs_each":
        idx = [(0, j) for j in range(1, k)]
    else:
        idx = [(i, j) for i in range(k) for j in range(i + 1, k)]
    return [
        Example(
            example.prompt_ids,
            [example.response_ids[i], example.response_ids[j]],
            kind="pairwise",
            scores=[scores[i], scores[j]],
            source_row=example.source_row,
            meta={"ranks": (i, j)},
        )
        for i, j in idx
        if scores[i] > scores[j]
    ]


@functools.lru_cache(maxsize=1)
def _code_hash() -> str:
    """The data layer's own code, so a change in how data is read or tokenized invalidates caches.
    Hashed once per process: what counts is the code that was imported, not later edits on disk."""
    import preftune

    h = hashlib.blake2b(digest_size=12)
    h.update(preftune.__version__.encode())
    from preftune.data import MODULES

    here = Path(__file__).parent
    for name in MODULES[: MODULES.index("pipeline") + 1]:
        h.update((here / f"{name}.py").read_bytes())
    return h.hexdigest()


def _problem_counts(problems: list[Problem]) -> tuple[int, Counter[str]]:
    """Distinct bad rows, and how many rows each kind of problem hit."""
    seen: set[tuple[int | None, str]] = set()
    for p in problems:
        seen.add((p.row, p.category))
    return len({r for r, _ in seen}), Counter(c for _, c in seen)


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while building millions of small lists and dicts (none
    of which form cycles); its repeated full scans otherwise cost ~3x the building itself."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


def prepare_examples(
    source: str | Path | list[dict[str, Any]],
    *,
    tokenizer: Any,
    kind: str | None = None,
    columns: str | dict[str, str] | None = None,
    split: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation: str = "truncate",
    max_positions: int | None = None,
    on_invalid: str = "error",
    cache_dir: str | Path | None = None,
    ranked_pairs: str | None = None,
    chat_template: str | None = None,
    use_chat_template: bool | None = None,
    num_proc: int | None = None,
    use_cache: bool = True,
    add_eos: bool = True,
) -> PreparedData:
    """Read, validate, format, tokenize (or load from the cache) the records of `source`.

    source:        a .jsonl/.json/.parquet/.csv file, a `save_to_disk` folder, a hub id, or a list of dicts.
    tokenizer:     a tokenizer object or a folder to load with AutoTokenizer.from_pretrained.
    kind:          pairwise | unpaired | ranked; detected from the fields when None.
    columns:       field → column mapping, "chosen=response_a,rejected=response_b" or a dict.
    split:         "train", "test", "train[:90%]"...; a single file is the split "train".
    on_invalid:    "error" raises one DataError listing every bad row; "drop" skips them and counts why.
    cache_dir:     where tokenized data is cached (default $PREFTUNE_CACHE/tokenized or ~/.cache/preftune/tokenized).
    ranked_pairs:  turn ranked examples into pairwise ones: best_vs_worst | best_vs_each | all_pairs.
    chat_template: Jinja text or a file that replaces the tokenizer's template.
    num_proc:      tokenizer processes (default 2 for more than 20k rows on a 2+ core machine).
    add_eos:       append EOS to every response (False for responses cut mid-answer).
    max_length, max_prompt_length, max_completion_length: token limits (None or 0: no limit).
    truncation:    "truncate" cuts a row over a limit (the prompt keeps its end, each response its
                   start); "drop" skips it; either way the summary counts them (see `tokenize`).
    max_positions: the model's max_position_embeddings: sequences longer than it are a warning,
                   or an error naming the row when max_length is unset.
    """
    with gc_paused():
        return _prepare(
            source,
            tok_arg=tokenizer,
            kind=kind,
            columns=columns,
            split=split,
            trunc=Truncation(
                max_length or None, max_prompt_length or None, max_completion_length or None, truncation
            ),
            max_positions=max_positions,
            on_invalid=on_invalid,
            cache_dir=cache_dir,
            ranked_pairs=ranked_pairs,
            chat_template=chat_template,
            use_chat_template=use_chat_template,
            num_proc=num_proc,
            use_cache=use_cache,
            add_eos=add_eos,
        )


def _fingerprint(
    source: str | Path | list[dict[str, Any]],
    split: str | None,
    cols: dict[str, str],
    kind: str | None,
    on_invalid: str,
    tok: Any,
    fmt: FormatOptions,
    trunc: Truncation,
) -> str:
    """The cache key: everything that changes the tokenized examples (module docstring)."""
    key = json.dumps(
        {
            "format": CACHE_FORMAT,
            "code": _code_hash(),
            "data": content_hash(source, split=split),
            "columns": cols,
            "kind": kind,
            "on_invalid": on_invalid,
            "tokenizer": tokenizer_fingerprint(tok),
            "formatting": fmt.fingerprint(),
            "lengths": trunc.fingerprint(),
        },
        sort_keys=True,
    )
    return hashlib.blake2b(key.encode(), digest_size=16).hexdigest()


def _prepare(
    source: str | Path | list[dict[str, Any]],
    *,
    tok_arg: Any,
    kind: str | None,
    columns: str | dict[str, str] | None,
    split: str | None,
    trunc: Truncation,
    max_positions: int | None,
    on_invalid: str,
    cache_dir: str | Path | None,
    ranked_pairs: str | None,
    chat_template: str | None,
    use_chat_template: bool | None,
    num_proc: int | None,
    use_cache: bool,
    add_eos: bool,
) -> PreparedData:
    start = time.perf_counter()
    if on_invalid not in ON_INVALID:
        raise ConfigError(f"on_invalid='{on_invalid}' — use 'error' or 'drop'")
    if ranked_pairs is not None and ranked_pairs not in RANKED_PAIRS:
        raise ConfigError(f"ranked_pairs='{ranked_pairs}' — use one of {', '.join(RANKED_PAIRS)}")
    cols = parse_columns(columns)
    tok = load_tokenizer(tok_arg)
    fmt = FormatOptions(
        chat_template=read_template(chat_template), use_chat_template=use_chat_template, add_eos=add_eos
    )
    label = "<records>" if isinstance(source, list) else str(source)
    fingerprint = _fingerprint(source, split, cols, kind, on_invalid, tok, fmt, trunc)
    cache_path = cache_io.cache_file(cache_dir or cache_io.default_cache_dir(), fingerprint)
    status = "off"
    if use_cache:
        try:
            hit = cache_io.load(cache_path)
        except cache_io.CacheCorrupt:
            hit, status = None, "rebuilt"
        if hit is not None:
            data, cached = hit
            cached.update(cache="hit", cache_file=str(cache_path))
            return _finish(data, cached, fingerprint, ranked_pairs, start, (trunc, max_positions))
        status = "rebuilt" if status == "rebuilt" else "miss"

    source_data, records, problems, found = _read_valid(source, split, kind, cols, on_invalid, label)
    conversational = any(r.conversational for r in records)
    formatter = Formatter.create(tok, fmt, conversational=conversational, source=label)
    t_tok = time.perf_counter()
    result = tokenize_records(records, formatter, trunc, found, path=label, num_proc=num_proc)
    t_tok = time.perf_counter() - t_tok
    template_problems = [p for p in result.problems if p.reason and p.reason.startswith("chat template")]
    if template_problems and on_invalid == "error":
        raise DataError(
            f"{len(template_problems)} problem(s) formatting {label}:\n" + render_problems(template_problems)
        )
    summary = _summary(label, found, conversational, len(source_data.rows), result, problems, t_tok)
    if use_cache:
        try:
            cache_io.save(cache_path, result.data, summary)
            summary["cache_file"] = str(cache_path)
        except OSError as err:  # a read-only or full disk must not stop training
            status = f"not written ({err.strerror})"
    summary["cache"] = status
    return _finish(result.data, summary, fingerprint, ranked_pairs, start, (trunc, max_positions))


def _read_valid(
    source: str | Path | list[dict[str, Any]],
    split: str | None,
    kind: str | None,
    cols: dict[str, str],
    on_invalid: str,
    label: str,
) -> tuple[SourceData, list[Record], list[Problem], Kind]:
    """Read and check the records of `source`: one DataError listing every problem when a problem
    is fatal (no kind, a missing column) or bad rows may not be dropped."""
    source_data = read_source(source, split=split)
    _refuse_images(source_data, cols)
    records, problems, found = validate(source_data, kind=kind, columns=cols)
    fatal = [p for p in problems if p.row is None]
    if fatal or found is None or (problems and on_invalid == "error"):
        n_rows, _ = _problem_counts(problems)
        raise DataError(
            f"{len(problems)} problem(s) in {label} ({n_rows} of {len(source_data.rows)} rows):\n"
            + render_problems(problems)
            + (
                ""
                if fatal
                else "\nfix them, or skip bad rows with on_invalid='drop' (CLI: --on-invalid drop)"
            )
        )
    return source_data, records, problems, found


def _refuse_images(data: SourceData, cols: dict[str, str]) -> None:
    """Image preference data (image paths, bytes, Pick-a-Pic fields) is a diffusion pipeline's: a
    language model would learn the file names as text."""
    from preftune.diffusion.imagedata import looks_like_images

    first = next(((row, rec) for row, rec in data.rows if rec is not None), None)
    if first is not None and not cols and looks_like_images(first[1]):
        raise DataError(
            "holds image preference data (images or image paths, not text)",
            path=data.path,
            row=first[0],
            fix="train it with a diffusers pipeline folder as --model (docs/diffusion.md); a language "
            "model needs text responses",
        )


def _summary(
    label: str,
    found: Kind,
    conversational: bool,
    rows: int,
    result: TokenizeResult,
    problems: list[Problem],
    tokenize_seconds: float,
) -> dict[str, Any]:
    """The data summary of a freshly tokenized source (cached with the data, logged every run)."""
    dropped, reasons = _problem_counts(problems + result.problems)
    return {
        "source": label,
        "kind": found,
        "conversational": conversational,
        "rows": rows,
        "examples": len(result.data),
        "dropped": dropped,
        "reasons": dict(reasons),
        "truncated": result.counts["truncated"],
        "truncated_prompt": result.counts["truncated_prompt"],
        "truncated_response": result.counts["truncated_response"],
        "tokens": int(len(result.data.tokens)),
        "problems": [p.render() for p in (problems + result.problems)[:SHOWN_PROBLEMS]],
        "tokenize_seconds": round(tokenize_seconds, 3),
        "num_proc": result.num_proc,
    }


def _finish(
    data: Tokenized,
    summary: dict[str, Any],
    fingerprint: str,
    ranked_pairs: str | None,
    start: float,
    lengths: tuple[Truncation, int | None],
) -> PreparedData:
    too_long = check_positions(data, lengths[0].max_length, lengths[1], str(summary.get("source")))
    examples = data.examples()
    if ranked_pairs is not None and data.kind != "ranked":
        raise ConfigError(
            f"ranked_pairs='{ranked_pairs}' needs ranked data, but {summary.get('source')} is "
            f"{data.kind} — leave ranked_pairs unset"
        )
    if ranked_pairs is not None:
        examples = [pair for ex in examples for pair in ranked_to_pairs(ex, ranked_pairs)]
        summary.update(ranked_pairs=ranked_pairs, examples=len(examples))
    summary["seconds"] = round(time.perf_counter() - start, 3)
    if summary.get("dropped") or summary.get("truncated"):
        # Said on every run, cached or not: nothing is dropped or cut silently.
        log.warning(format_summary(summary))
    if too_long:
        log.warning(too_long)
    return PreparedData(examples, fingerprint, summary)
