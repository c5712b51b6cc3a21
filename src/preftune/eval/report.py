"""The HTML report of one run: `RUN/report.html`, one self-contained file (PNG plots inlined as base64).

It is built only from what a run leaves on disk — `metrics.jsonl` (one JSON object per logged step, with
`step`, `split` and the metrics of docs/algorithms.md §5), `summary.json` and `config.yaml` — so
`preftune report RUN` can regenerate it at any time, also for a run that is still going or that died.
A metric that was not logged is not plotted, and the report says which ones are missing.
"""

from __future__ import annotations

import base64
import html
import json
import math
import os
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from preftune.errors import DataError
from preftune.eval import plots
from preftune.eval.diagnose import findings
from preftune.eval.plots import CHOSEN, NEUTRAL, REJECTED, SECOND, Curve, Panel


def _section(sid: str, title: str, about: str, *panels: Panel) -> tuple[str, str, str, tuple[Panel, ...]]:
    return sid, title, about, panels


# (id, title, how to read it, panels). The ids are stable: tests and links rely on them.
SECTIONS = (
    _section(
        "loss",
        "Loss",
        "The training objective (lower is better). Eval points use the same loss on "
        "held-out pairs; a widening gap between the lines is over-fitting.",
        Panel("Loss", "loss (the objective's units)", (Curve("loss", "loss", NEUTRAL),)),
    ),
    _section(
        "rewards",
        "Implicit rewards and margin",
        "Implicit reward r̂(y) = β·(log π_θ(y) − log π_ref(y)) of chosen and rejected responses, and "
        "the margin β·h = r̂(chosen) − r̂(rejected). Training should open the margin; both rewards "
        "falling together means the policy lowers every response, not just the rejected ones. Unpaired "
        "methods (KTO) log one implicit reward over all their completions instead.",
        Panel(
            "Implicit rewards",
            "β · log-ratio (nats)",
            (
                Curve("rewards/chosen", "chosen", CHOSEN),
                Curve("rewards/rejected", "rejected", REJECTED),
                Curve("rewards/implicit", "all completions (unpaired)", SECOND, optional=True),
            ),
            hline=0.0,
        ),
        Panel("Reward margin", "β · h (nats)", (Curve("rewards/margin", "margin", NEUTRAL),), hline=0.0),
    ),
    _section(
        "reward_accuracy",
        "Reward accuracy",
        "Fraction of pairs whose implicit reward ranks chosen above rejected (h > 0). 0.5 is chance.",
        Panel(
            "Reward accuracy",
            "fraction of pairs",
            (Curve("rewards/accuracy", "reward accuracy"),),
            hline=0.5,
            ylim=(-0.02, 1.02),
        ),
    ),
    _section(
        "logps",
        "Chosen and rejected log-probabilities",
        "Mean per-token log π_θ of chosen and rejected responses. A falling chosen curve while the "
        "margin grows is the over-optimisation signature (Rashidinejad & Tian 2024; Shi et al. 2024): "
        "the policy wins the margin by pushing everything down.",
        Panel(
            "Per-token log-probability",
            "log π_θ(y) / |y| (nats per token)",
            (
                Curve("logps/chosen_per_token", "chosen", CHOSEN),
                Curve("logps/rejected_per_token", "rejected", REJECTED),
            ),
        ),
    ),
    _section(
        "ranking",
        "Policy ranking accuracy",
        "Fraction of pairs where the policy itself gives chosen the higher log-probability, "
        "log π_θ(y_w) > log π_θ(y_l) (Chen et al. 2024). It often stays far below reward accuracy.",
        Panel(
            "Policy ranking accuracy",
            "fraction of pairs",
            (Curve("policy_rank_accuracy", "ranking accuracy", NEUTRAL),),
            hline=0.5,
            ylim=(-0.02, 1.02),
        ),
    ),
    _section(
        "optimisation",
        "Gradient norm and learning rate",
        "Global gradient norm before clipping (log scale: spikes stand out) and the scheduled learning rate.",
        Panel(
            "Gradient norm", "‖g‖₂ (before clipping)", (Curve("grad_norm", "grad norm", NEUTRAL),), log_y=True
        ),
        Panel("Learning rate", "learning rate", (Curve("lr", "lr", SECOND, smooth=False),)),
    ),
    _section(
        "throughput",
        "Throughput",
        "Training speed per optimizer step, measured by the trainer.",
        Panel("Tokens per second", "tokens / s", (Curve("tokens_per_s", "tokens/s", NEUTRAL),)),
        Panel(
            "Examples per second", "examples (pairs) / s", (Curve("examples_per_s", "examples/s", SECOND),)
        ),
    ),
)
_NOT_METRICS = {"step", "split", "phase", "epoch", "time", "timestamp", "elapsed_s", "wall_time"}
# Logged, shown in the final table, but not worth a plot: a 0/1 flag and per-step counts.
_NOT_PLOTTED = {"skipped", "tokens", "examples"}
_NOT_SMOOTHED = {"lr", "skipped"}  # schedules and flags: an average would misstate them
MAX_OTHER_PANELS = 12


def read_metrics(path: Path) -> tuple[list[dict[str, Any]], list[str]]:
    """Records of a metrics.jsonl file and warnings about the lines that could not be read.

    A run that died mid-write leaves a truncated last line; that must not stop its report, so bad lines
    are skipped and reported instead of raised. No readable record at all is an error.
    """
    if not path.is_file():
        raise DataError(
            "no metrics.jsonl here",
            path=str(path),
            fix="pass the folder of a training run (it holds metrics.jsonl), e.g. runs/dpo1",
        )
    records: list[dict[str, Any]] = []
    warnings: list[str] = []
    with path.open(encoding="utf-8") as fh:
        for row, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as err:
                warnings.append(f"{path.name}:{row}: skipped, not valid JSON ({err.msg})")
                continue
            if not isinstance(rec, dict):
                warnings.append(f"{path.name}:{row}: skipped, not a JSON object")
                continue
            records.append(rec)
    if not records:
        raise DataError(
            "no readable metrics records", path=str(path), fix="check that the run logged at least one step"
        )
    return records, warnings


def _read_json(path: Path, warnings: list[str]) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        warnings.append(f"{path.name}: not readable JSON ({err}); its contents are left out")
        return {}
    return data if isinstance(data, dict) else {}


def _read_config(run_dir: Path, summary: Mapping[str, Any], warnings: list[str]) -> dict[str, Any]:
    path = run_dir / "config.yaml"
    if path.is_file():
        import yaml

        try:
            data = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError as err:
            warnings.append(f"config.yaml: not readable YAML ({err}); its contents are left out")
            data = None
        if isinstance(data, dict):
            return data
    config = summary.get("config")
    return config if isinstance(config, dict) else {}


def accuracy_groups(summary: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """Before/after task accuracy pairs in a summary, by decoding mode.

    Reads `accuracy_before`/`accuracy_after` (mode "greedy", or per mode when they are dicts such as
    {"greedy": 0.4, "sampled": 0.3}) and `accuracy_before_MODE`/`accuracy_after_MODE`.
    """
    groups: dict[str, tuple[float, float]] = {}

    def add(mode: str, before: Any, after: Any) -> None:
        if _is_number(before) and _is_number(after):
            groups[mode] = (float(before), float(after))

    before, after = summary.get("accuracy_before"), summary.get("accuracy_after")
    if isinstance(before, dict) and isinstance(after, dict):
        for mode in before:
            add(str(mode), before.get(mode), after.get(mode))
    else:
        add("greedy", before, after)
    for key in summary:
        if key.startswith("accuracy_before_"):
            mode = key.removeprefix("accuracy_before_")
            add(mode, summary[key], summary.get(f"accuracy_after_{mode}"))
    return groups


def _is_number(value: Any) -> bool:
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


def final_metrics(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(metric, last train value, smoothed last train value, last eval value) for every numeric metric."""
    keys: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if key not in _NOT_METRICS and _is_number(value):
                keys.setdefault(key)
    rows = []
    for key in keys:
        _, train = plots.metric_series(records, key, "train")
        _, ev = plots.metric_series(records, key, "eval")
        window = 0 if key in _NOT_SMOOTHED else plots.smoothing_window(len(train))
        smooth = plots.smooth(train, window)[-1] if train else None
        rows.append(
            (key, fmt(train[-1]) if train else "–", fmt(smooth) if train else "–", fmt(ev[-1]) if ev else "–")
        )
    return rows


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


def _cards(items: Sequence[tuple[str, str]]) -> str:
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card"><div class="v">{html.escape(v)}</div><div class="k">{html.escape(k)}</div></div>'
            for k, v in items
        )
        + "</div>"
    )


def _last(records: Sequence[Mapping[str, Any]], key: str, split: str) -> float | None:
    _, values = plots.metric_series(records, key, split)
    return values[-1] if values else None


def render_extra(extra: Mapping[str, Any]) -> str:
    """Free-form details a caller adds (quickstart: SFT stats, sample generations): tables and text."""
    scalars = [
        (k, v) for k, v in extra.items() if not isinstance(v, dict | list | tuple) and "\n" not in str(v)
    ]
    parts = [html_table(["item", "value"], scalars)] if scalars else []
    for key, value in extra.items():
        if isinstance(value, dict | list | tuple):
            text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
        elif "\n" in str(value):
            text = str(value)
        else:
            continue
        parts.append(f"<h3>{html.escape(str(key))}</h3><pre>{html.escape(text)}</pre>")
    return "".join(parts)


def build_report_html(
    records: Sequence[Mapping[str, Any]],
    *,
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    title: str,
    extra: Mapping[str, Any] | None = None,
    warnings: Sequence[str] = (),
    evaluation: Mapping[str, Any] | None = None,
) -> str:
    """The report page of one run, from its metrics records, summary and config (pure: no file I/O);
    `evaluation`: what `preftune eval` wrote (RUN/eval.json), shown after the final metrics."""
    body: list[str] = []
    method = summary.get("method") or config.get("method") or "?"
    steps = [float(r["step"]) for r in records if _is_number(r.get("step"))]
    cards = [("method", str(method)), ("steps", fmt(max(steps)) if steps else "–")]
    if _is_number(summary.get("seconds")):
        cards.append(("wall time", f"{float(summary['seconds']):.0f} s"))
    groups = accuracy_groups(summary)
    for mode, (before, after) in groups.items():
        cards.append((f"task accuracy ({mode})", f"{100 * before:.1f}% → {100 * after:.1f}%"))
    for key, label in (("rewards/accuracy", "reward accuracy"), ("loss", "loss")):
        value = _last(records, key, "eval")
        split = "eval"
        if value is None:
            value, split = _last(records, key, "train"), "train"
        if value is not None:
            cards.append((f"final {label} ({split})", fmt(value)))
    body.append(_cards(cards))
    notes = findings(records)
    if notes:
        body.append(
            '<div class="finding"><b>Findings</b><ul>'
            + "".join(f"<li>{html.escape(n)}</li>" for n in notes)
            + "</ul></div>"
        )
    skipped = sum(1 for r in records if r.get("split", "train") == "train" and r.get("skipped"))
    if skipped:
        warnings = [*warnings, f"{skipped} step(s) skipped: non-finite loss or gradient (on_nonfinite=skip)"]
    if warnings:
        body.append('<div class="warn">' + "<br>".join(html.escape(w) for w in warnings) + "</div>")

    if groups:
        body.append(
            '<h2 id="task-accuracy">Task accuracy before and after</h2><p class="about">Held-out '
            "accuracy of the verifier-checked task, before training (the starting model) and after.</p>"
        )
        body.append(
            figure(
                "accuracy",
                plots.plot_accuracy_before_after(
                    groups,
                    title="Held-out task accuracy"
                    + (f" ({summary['heldout_prompts']} prompts)" if summary.get("heldout_prompts") else ""),
                ),
                "task accuracy before and after training",
            )
        )

    missing: list[str] = []
    for sid, stitle, about, panels in SECTIONS:
        present = [p for p in panels if plots.panel_has_data(records, p)]
        absent_keys = [
            c.key
            for p in panels
            for c in p.curves
            if not c.optional and c.key not in plots.panel_has_data(records, p)
        ]
        if not present:
            missing.append(f"{stitle} ({', '.join(absent_keys)})")
            continue
        body.append(f'<h2 id="{sid}">{html.escape(stitle)}</h2><p class="about">{html.escape(about)}</p>')
        if absent_keys:
            body.append(f'<p class="missing">Not logged: {html.escape(", ".join(absent_keys))}.</p>')
        body.append(figure(sid, plots.plot_panels(records, present), stitle))

    known = {c.key for _, _, _, panels in SECTIONS for p in panels for c in p.curves} | _NOT_METRICS
    others = [row[0] for row in final_metrics(records) if row[0] not in known | _NOT_PLOTTED]
    if others:
        shown = others[:MAX_OTHER_PANELS]
        body.append(
            '<h2 id="other">Other logged metrics</h2><p class="about">Metrics specific to this '
            f"loss or trainer: {html.escape(', '.join(others))}.</p>"
        )
        for i in range(0, len(shown), 3):
            chunk = [
                Panel(k, k, (Curve(k, k, plots.PALETTE[j % len(plots.PALETTE)]),))
                for j, k in enumerate(shown[i : i + 3])
            ]
            body.append(figure(f"other-{i // 3}", plots.plot_panels(records, chunk), "other metrics"))
    if missing:
        body.append(
            '<p class="missing">Not plotted, because the run did not log them: '
            + html.escape("; ".join(missing))
            + ".</p>"
        )

    body.append('<h2 id="final-metrics">Final metrics</h2>')
    body.append(
        html_table(["metric", "train (last)", "train (smoothed)", "eval (last)"], final_metrics(records))
    )
    if evaluation:
        body.append(render_evaluation(evaluation))
    if summary:
        body.append('<h2 id="summary">Summary</h2>')
        body.append(
            html_table(
                ["key", "value"],
                [
                    (k, v)
                    for k, v in flatten(summary).items()
                    # the trainer's final train/eval metrics are already in the table above
                    if k.split(".")[0] not in ("config", "train", "eval")
                ],
            )
        )
    if config:
        body.append('<h2 id="config">Configuration</h2>')
        body.append(html_table(["key", "value"], list(flatten(config).items())))
    if extra:
        body.append('<h2 id="details">Details</h2>' + render_extra(extra))
    return page(title, f"{len(records)} logged records", "".join(body))


def render_evaluation(result: Mapping[str, Any]) -> str:
    """`preftune eval`'s results (RUN/eval.json): held-out metrics of final/ and the sampled KL."""
    metrics = result.get("metrics")
    rows = list(flatten(metrics).items()) if isinstance(metrics, Mapping) else []
    kl = result.get("kl")
    if isinstance(kl, Mapping):
        rows += [(f"kl/{k}", v) for k, v in kl.items()]
    about = (
        f"preftune eval of final/ on {result.get('data', '?')} against the reference "
        f"{result.get('reference', '?')} (RUN/eval.json)."
    )
    return (
        '<h2 id="heldout-eval">Held-out evaluation (preftune eval)</h2>'
        f'<p class="about">{html.escape(about)}</p>' + html_table(["metric", "value"], rows)
    )


def write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file and rename, so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def write_report(run_dir: str | os.PathLike[str], *, extra: dict[str, Any] | None = None) -> Path:
    """Write RUN/report.html from RUN/metrics.jsonl, RUN/summary.json, RUN/config.yaml and, when
    present, `preftune eval`'s RUN/eval.json; return its path.

    `extra` adds free-form details (numbers, text, lists, dicts) in a "Details" section at the end.
    Raises DataError when RUN has no readable metrics.jsonl.
    """
    run = Path(run_dir)
    records, warnings = read_metrics(run / "metrics.jsonl")
    summary = _read_json(run / "summary.json", warnings)
    evaluation = _read_json(run / "eval.json", warnings)
    config = _read_config(run, summary, warnings)
    method = summary.get("method") or config.get("method")
    title = (
        f"preftune run report: {method} · {run.resolve().name}"
        if method
        else f"preftune run report · {run.resolve().name}"
    )
    out = run / "report.html"
    write_atomic(
        out,
        build_report_html(
            records,
            summary=summary,
            config=config,
            title=title,
            extra=extra,
            warnings=warnings,
            evaluation=evaluation,
        ),
    )
    return out
