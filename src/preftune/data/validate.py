"""`preftune data check`: every problem of a data source, or a summary of valid data.

The checks are those that run before every training run (`schema.validate`); with a tokenizer the
records are also formatted and tokenized, which catches chat-template problems and gives token-length
percentiles to choose `max_length` / `max_prompt_length` from.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from preftune.data.formatting import FormatOptions, Formatter, load_tokenizer, read_template
from preftune.data.layouts import parse_columns
from preftune.data.lengths import Truncation
from preftune.data.rows import Problem, render_problems
from preftune.data.schema import validate
from preftune.data.sources import SourceData, read_source
from preftune.data.tokenize import Tokenized, tokenize_records
from preftune.errors import DataError

PERCENTILES = (50, 90, 99, 100)
GIANT_ROW = 1 << 17  # tokens: with no max_length and no known model limit, a longer row is a mistake


@dataclass
class CheckResult:
    """problems: every problem in row order; summary: rows, valid, kind, conversational and, with a
    tokenizer, token-length percentiles {"prompt"|"response"|"total": {"p50", "p90", "p99", "max"}}."""

    problems: list[Problem] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_data(
    source: str | Path | list[dict[str, Any]] | SourceData,
    *,
    kind: str | None = None,
    columns: str | dict[str, str] | None = None,
    split: str | None = None,
    tokenizer: Any = None,
    chat_template: str | None = None,
    max_length: int | None = None,
    max_prompt_length: int | None = None,
    max_completion_length: int | None = None,
    truncation: str = "truncate",
) -> CheckResult:
    """Check `source` (or data `read_source` already read) as training would, without writing any cache."""
    cols = parse_columns(columns)
    data = source if isinstance(source, SourceData) else read_source(source, split=split)
    records, problems, found = validate(data, kind=kind, columns=cols)
    summary: dict[str, Any] = {
        "source": data.path,
        "rows": len(data.rows),
        "valid": len(records),
        "kind": found,
        "conversational": any(r.conversational for r in records),
    }
    result = CheckResult(problems, summary)
    if tokenizer is None or not records:
        return result
    tok = load_tokenizer(tokenizer)
    formatter = Formatter.create(
        tok,
        FormatOptions(chat_template=read_template(chat_template)),
        conversational=summary["conversational"],
        source=data.path,
    )
    out = tokenize_records(
        records,
        formatter,
        Truncation(max_length or None, max_prompt_length or None, max_completion_length or None, truncation),
        str(found),
        path=data.path,
    )
    result.problems = sorted(
        problems + [p for p in out.problems if p.reason and p.reason.startswith("chat")],
        key=lambda p: -1 if p.row is None else p.row,
    )
    summary["tokens"] = {name: _percentiles(v) for name, v in out.data.lengths().items()}
    summary["truncated"] = out.counts["truncated"]
    summary["dropped_by_length"] = sum(1 for p in out.problems if not (p.reason or "").startswith("chat"))
    return result


def check_positions(
    data: Tokenized, max_length: int | None, max_positions: int | None, source: str
) -> str | None:
    """Sequences (prompt + response) longer than the model's `max_positions`: a warning to log (their
    count, the longest and its row) when max_length allows them; with max_length unset, a DataError
    naming the row and the option, raised before any model sees the data (also above GIANT_ROW
    tokens when the model's limit is unknown)."""
    total = data.lengths()["total"]
    if len(total) == 0:
        return None
    i = int(np.argmax(total))
    longest = int(total[i])
    row = int(np.repeat(data.rows, data.branches.astype(np.int64))[i])
    if max_length is None:
        limit = max_positions or GIANT_ROW
        if longest > limit:
            what = (
                f"the model's max_position_embeddings={max_positions}" if max_positions else f"{limit} tokens"
            )
            raise DataError(
                f"prompt + response has {longest} tokens, over {what}, and max_length is unset",
                path=source,
                row=row,
                fix=f"set max_length (CLI --max-length {max_positions or 1024}) to truncate long rows, "
                "with truncation='drop' to skip them instead",
            )
        return None
    if max_positions and longest > max_positions:
        n = int((total > max_positions).sum())
        return (
            f"{source}: {n} sequence(s) longer than the model's max_position_embeddings={max_positions} "
            f"(longest: {longest} tokens, row {row}) — lower max_length to {max_positions}"
        )
    return None


def _percentiles(values: np.ndarray) -> dict[str, int]:
    if len(values) == 0:
        return {}
    qs = np.percentile(values, PERCENTILES, method="nearest")
    return {("max" if q == 100 else f"p{q}"): int(v) for q, v in zip(PERCENTILES, qs)}


def token_lengths(values: Any) -> dict[str, int]:
    """{"p50", "p90", "p99", "max"} of token lengths, as `preftune data check` prints them."""
    return _percentiles(np.asarray(values))


def token_table(tokens: dict[str, dict[str, int]]) -> list[str]:
    """`preftune data check`'s token-length table: a header, then one line per name (prompt, ...)."""
    keys = ("p50", "p90", "p99", "max")
    lines = [f"{'tokens':<10}" + "".join(f"{k:>8}" for k in keys)]
    return lines + [
        f"{name:<10}" + "".join(f"{pct.get(k, 0):>8}" for k in keys) for name, pct in tokens.items()
    ]


def format_summary(summary: dict[str, Any]) -> str:
    """One paragraph a trainer prints after `prepare_examples`: rows, kept, dropped and why, truncation."""
    lines = [
        f"{summary.get('source')}: {summary.get('rows')} rows, kind {summary.get('kind')} → "
        f"{summary.get('examples')} examples ({summary.get('tokens', 0)} tokens; cache {summary.get('cache')})"
    ]
    if summary.get("dropped"):
        why = ", ".join(
            f"{k}: {v}" for k, v in sorted(summary.get("reasons", {}).items(), key=lambda x: -x[1])
        )
        lines.append(f"dropped {_rows(summary['dropped'])} ({why})")
    if summary.get("truncated"):
        lines.append(
            f"truncated {_rows(summary['truncated'])} (prompt: {summary.get('truncated_prompt', 0)}, "
            f"response: {summary.get('truncated_response', 0)})"
        )
    return "\n".join(lines)


def _rows(n: int) -> str:
    return f"{n} row" if n == 1 else f"{n} rows"


def format_check(result: CheckResult, cap: int = 20) -> str:
    """What `preftune data check` prints."""
    s = result.summary
    if not result.ok:
        bad_rows = len({p.row for p in result.problems if p.row is not None})
        whole = any(p.row is None for p in result.problems)
        where = f" in {bad_rows} of {s['rows']} rows" if bad_rows else ""
        advice = "fix the file" if whole else "fix them, or train with --on-invalid drop to skip them"
        return (
            render_problems(result.problems, cap)
            + f"\n{s['source']}: {len(result.problems)} problem(s){where} — {advice}"
        )
    form = "messages" if s["conversational"] else "text"
    lines = [f"{s['source']}: OK — {s['rows']} rows, kind {s['kind']} ({form})"]
    if "tokens" in s:
        lines += token_table(s["tokens"])
        if s.get("truncated") or s.get("dropped_by_length"):
            lines.append(
                f"with these limits: {s['truncated']} rows truncated, {s['dropped_by_length']} dropped"
            )
    return "\n".join(lines)
