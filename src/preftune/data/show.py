"""`preftune data show`: one example exactly as the model sees it.

Without a tokenizer, the validated record (after layout conversion and column mapping); with one,
the rendered text of the prompt and of each response, every token (its vocabulary entry, so token
boundaries are visible) with its id, and the loss mask: prompt tokens are context (mask 0, not
trained), response tokens are trained (mask 1). Truncation applies as in training.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from preftune.data.formatting import FormatOptions, Formatter, load_tokenizer, read_template
from preftune.data.layouts import apply_columns, normalize, parse_columns
from preftune.data.lengths import Truncation
from preftune.data.rows import SourceData, render_problems
from preftune.data.schema import Record, validate
from preftune.data.sources import read_source
from preftune.data.tokenize import tokenize_serial
from preftune.errors import DataError


def show_example(
    source: str | Path | list[dict[str, Any]],
    *,
    index: int = 0,
    tokenizer: Any = None,
    kind: str | None = None,
    columns: str | dict[str, str] | None = None,
    split: str | None = None,
    chat_template: str | None = None,
    trunc: Truncation | None = None,
    add_eos: bool = True,
) -> tuple[str, bool]:
    """The text `preftune data show` prints for row `index` (0-based) of `source`, and whether the
    row is valid (False: the text lists its problems)."""
    cols = parse_columns(columns)
    data = read_source(source, split=split)
    if not 0 <= index < len(data.rows):
        raise DataError(
            f"--index {index} is out of range: the data has {len(data.rows)} rows",
            path=data.path,
            fix=f"give --index from 0 to {len(data.rows) - 1}" if data.rows else "check the data",
        )
    row, raw = data.rows[index]
    if kind is None:  # the kind training would use: detected from the first record
        first = next(((r, x) for r, x in data.rows if x is not None), None)
        kind = validate(SourceData(data.path, [first] if first else []), columns=cols)[2]
    one = SourceData(data.path, [(row, raw)], [p for p in data.problems if p.row in (None, row)])
    records, problems, found = validate(one, kind=kind, columns=cols)
    if problems or not records:
        return render_problems(problems) or f"{data.path}:{row}: not a record", False
    rec = records[0]
    layout = normalize(apply_columns(raw or {}, cols))[2]
    head = f"{data.path}:{row} (index {index}): {found}, {'messages' if rec.conversational else 'text'}"
    head += f", {layout} layout" if layout != "standard" else ""
    if tokenizer is None:
        return head + "\n" + _record_text(rec), True
    tok = load_tokenizer(tokenizer)
    formatter = Formatter.create(
        tok,
        FormatOptions(chat_template=read_template(chat_template), add_eos=add_eos),
        conversational=rec.conversational,
        source=data.path,
    )
    out = tokenize_serial([rec], formatter, trunc or Truncation(), str(found), data.path)
    if out.problems:
        return render_problems(out.problems), False
    prompt_text, texts = formatter.render(rec)
    (ex,) = out.data.examples()
    lines = [head + f"; tokenizer {getattr(tok, 'name_or_path', '') or type(tok).__name__}"]
    cut = [k for k in ("truncated_prompt", "truncated_response") if out.counts[k]]
    if cut:
        lines.append("truncated: " + ", ".join(k.split("_")[1] for k in cut) + " (as in training)")
    lines += _segment(tok, "prompt", prompt_text, ex.prompt_ids, trained=False)
    for name, text, ids in zip(_names(rec), texts, ex.response_ids):
        lines += _segment(tok, name, text, ids, trained=True)
        lines.append(
            f"  sequence prompt + {name}: {len(ex.prompt_ids) + len(ids)} tokens, loss mask "
            + "0" * len(ex.prompt_ids)
            + "1" * len(ids)
        )
    return "\n".join(lines), True


def _names(rec: Record) -> list[str]:
    if rec.kind == "pairwise":
        return ["chosen", "rejected"]
    if rec.kind == "unpaired":
        return [f"completion (label {'desirable' if rec.label else 'undesirable'})"]
    return [f"responses[{i}] (score {s:g})" for i, s in enumerate(rec.scores or [])]


def _segment(tok: Any, name: str, text: str, ids: list[int], *, trained: bool) -> list[str]:
    pieces = [_visible(t) for t in tok.convert_ids_to_tokens(ids)]
    mask = "mask 1: trained" if trained else "mask 0: context, not trained"
    return [
        f"{name}: {len(ids)} tokens ({mask})",
        f"  text   {json.dumps(text, ensure_ascii=False)}",
        "  tokens " + "".join(f"[{p}]" for p in pieces),
        "  ids    " + " ".join(str(i) for i in ids),
    ]


def _visible(token: Any) -> str:
    """A token's vocabulary entry with whitespace and control characters made visible."""
    text = str(token)
    return json.dumps(text, ensure_ascii=False)[1:-1] if any(ch < " " for ch in text) else text


def _record_text(rec: Record) -> str:
    def show(content: Any) -> str:
        return json.dumps(content, ensure_ascii=False)

    lines = [f"prompt: {show(rec.prompt)}"]
    lines += [f"{name}: {show(r)}" for name, r in zip(_names(rec), rec.responses)]
    if rec.label is not None and rec.kind == "pairwise":
        lines.append(f"label: {rec.label:g}")
    lines.append("(give --tokenizer DIR to see the rendered text, the tokens and the loss mask)")
    return "\n".join(lines)
