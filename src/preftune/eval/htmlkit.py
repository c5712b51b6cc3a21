"""The pieces every preftune HTML page is built from: the page frame and its style, summary cards, a
findings box, tables, inline PNG figures, number formatting, and the atomic write."""

from __future__ import annotations

import base64
import html
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any


def is_number(value: Any) -> bool:
    """A finite int or float (not a bool)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def fmt(value: Any) -> str:
    """A number for a person: 4 significant digits, scientific when very large or small."""
    if isinstance(value, bool) or value is None:
        return str(value)
    if isinstance(value, int):
        return f"{value:,}" if abs(value) >= 10_000 else str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3e}"
        return f"{value:.4g}"
    return str(value)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts as one level with dotted keys ({"a": {"b": 1}} → {"a.b": 1})."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, f"{name}."))
        else:
            out[name] = value
    return out


def png_uri(png: bytes) -> str:
    """`png` as a data: URI, so the page needs no other file."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def html_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join(
        "<tr>"
        + "".join(f"<td>{html.escape(fmt(c) if not isinstance(c, str) else c)}</td>" for c in row)
        + "</tr>"
        for row in rows
    )
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def figure(sid: str, png: bytes, alt: str) -> str:
    return f'<figure id="plot-{sid}"><img alt="{html.escape(alt)}" src="{png_uri(png)}"></figure>'


CSS = """
body{font-family:-apple-system,'Segoe UI',Helvetica,Arial,sans-serif;max-width:1080px;margin:2em auto;
padding:0 1.2em;color:#1f2328;line-height:1.5}
h1{font-size:1.6em;margin-bottom:.1em}h2{font-size:1.2em;margin-top:2em;border-bottom:1px solid #d0d7de;
padding-bottom:.2em}.sub{color:#59636e;margin-top:0}.about{color:#424a53;font-size:.93em;max-width:60em}
.cards{display:flex;flex-wrap:wrap;gap:.8em;margin:1.2em 0}.card{border:1px solid #d0d7de;border-radius:8px;
padding:.6em 1em;min-width:9em}.card .v{font-size:1.35em;font-weight:600}.card .k{color:#59636e;font-size:.82em}
figure{margin:.6em 0}img{max-width:100%;height:auto}table{border-collapse:collapse;font-size:.88em;margin:.6em 0}
th,td{border:1px solid #d0d7de;padding:.25em .7em;text-align:left;vertical-align:top}th{background:#f6f8fa}
td:not(:first-child){font-variant-numeric:tabular-nums}.warn{background:#fff8c5;border:1px solid #d4a72c;
border-radius:6px;padding:.5em 1em;font-size:.9em}.missing{color:#59636e;font-size:.9em}
pre{background:#f6f8fa;padding:.6em;border-radius:6px;overflow-x:auto;font-size:.85em}
.err{color:#b42318}.finding{background:#fff1f0;border:1px solid #e5a3a0;border-radius:6px;
padding:.5em 1em;margin:1em 0;font-size:.92em}.finding ul{margin:.3em 0}
"""


def page(title: str, subtitle: str, body: str) -> str:
    stamp = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style></head>'
        f'<body><h1>{html.escape(title)}</h1><p class="sub">{html.escape(subtitle)} · generated {stamp} '
        f"by preftune</p>{body}</body></html>\n"
    )


def cards(items: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v">{html.escape(v)}</div><div class="k">{html.escape(k)}</div></div>'
            for k, v in items
        )
        + "</div>"
    )


def findings_box(notes: Sequence[str]) -> str:
    """The highlighted list of one-line conclusions ("" when there are none)."""
    if not notes:
        return ""
    return (
        '<div class="finding"><b>Findings</b><ul>'
        + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
        + "</ul></div>"
    )


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
