"""The HTML report of one run: `RUN/report.html`, one self-contained file (PNG plots inlined as base64).

It is built only from what a run leaves on disk — `metrics.jsonl` (one JSON object per logged step, with
`step`, `split` and the metrics of docs/algorithms.md §5), `summary.json` and `config.yaml` — so
`preftune report RUN` can regenerate it at any time, also for a run that is still going or that died.
A metric that was not logged is not plotted, and the report says which ones are missing.
"""

from __future__ import annotations

import html
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from preftune.errors import DataError
from preftune.eval import plots
from preftune.eval.diagnose import findings
from preftune.eval.htmlkit import CSS as CSS
from preftune.eval.htmlkit import cards, findings_box, flatten, is_number
from preftune.eval.htmlkit import figure as figure
from preftune.eval.htmlkit import fmt as fmt
from preftune.eval.htmlkit import html_table as html_table
from preftune.eval.htmlkit import page as page
from preftune.eval.htmlkit import png_uri as png_uri
from preftune.eval.htmlkit import write_atomic as write_atomic
from preftune.eval.plots import Curve, Panel
from preftune.eval.report_sections import (
    INSTEAD_OF,
    MAX_OTHER_PANELS,
    NOT_METRICS,
    NOT_PLOTTED,
    NOT_SMOOTHED,
    OFFLINE_ONLY,
    ONLINE_ONLY,
)
from preftune.eval.report_sections import SECTIONS as SECTIONS


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
        if is_number(before) and is_number(after):
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


def final_metrics(records: Sequence[Mapping[str, Any]]) -> list[tuple[str, str, str, str]]:
    """(metric, last train value, smoothed last train value, last eval value) for every numeric metric."""
    keys: dict[str, None] = {}
    for rec in records:
        for key, value in rec.items():
            if key not in NOT_METRICS and is_number(value):
                keys.setdefault(key)
    rows = []
    for key in keys:
        _, train = plots.metric_series(records, key, "train")
        _, ev = plots.metric_series(records, key, "eval")
        window = 0 if key in NOT_SMOOTHED else plots.smoothing_window(len(train))
        smooth = plots.smooth(train, window)[-1] if train else None
        rows.append(
            (key, fmt(train[-1]) if train else "–", fmt(smooth) if train else "–", fmt(ev[-1]) if ev else "–")
        )
    return rows


def _last(records: Sequence[Mapping[str, Any]], key: str, split: str) -> float | None:
    _, values = plots.metric_series(records, key, split)
    return values[-1] if values else None


def render_extra(extra: Mapping[str, Any]) -> str:
    """Free-form details a caller adds (quickstart: SFT stats, sample generations): tables, text and
    PNG images (values of type bytes)."""
    scalars = [
        (k, v)
        for k, v in extra.items()
        if not isinstance(v, dict | list | tuple | bytes) and "\n" not in str(v)
    ]
    parts = [html_table(["item", "value"], scalars)] if scalars else []
    for n, (key, value) in enumerate(extra.items()):
        if isinstance(value, bytes):  # a PNG image (the diffusion quickstart's sample grids)
            parts.append(f"<h3>{html.escape(str(key))}</h3>" + figure(f"extra-{n}", value, str(key)))
            continue
        if isinstance(value, dict | list | tuple):
            text = json.dumps(value, indent=2, default=str, ensure_ascii=False)
        elif "\n" in str(value):
            text = str(value)
        else:
            continue
        parts.append(f"<h3>{html.escape(str(key))}</h3><pre>{html.escape(text)}</pre>")
    return "".join(parts)


def _summary_cards(
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    groups: Mapping[str, tuple[float, float]],
) -> str:
    """The cards at the top: method, steps, wall time, task accuracy, final reward accuracy and loss."""
    method = summary.get("method") or config.get("method") or "?"
    steps = [float(r["step"]) for r in records if is_number(r.get("step"))]
    items = [("method", str(method)), ("steps", fmt(max(steps)) if steps else "–")]
    if is_number(summary.get("seconds")):
        items.append(("wall time", f"{float(summary['seconds']):.0f} s"))
    for mode, (before, after) in groups.items():
        items.append((f"task accuracy ({mode})", f"{100 * before:.1f}% → {100 * after:.1f}%"))
    for key, label in (
        ("rewards/accuracy", "reward accuracy"),
        ("accuracy", "sample accuracy"),  # online methods with a 0/1 verifier
        ("loss", "loss"),
    ):
        value = _last(records, key, "eval")
        split = "eval"
        if value is None:
            value, split = _last(records, key, "train"), "train"
        if value is not None:
            items.append((f"final {label} ({split})", fmt(value)))
    return cards(items)


def _warnings_box(records: Sequence[Mapping[str, Any]], warnings: Sequence[str]) -> str:
    """Unreadable lines and files, and skipped steps ("" when there are none)."""
    skipped = sum(1 for r in records if r.get("split", "train") == "train" and r.get("skipped"))
    if skipped:
        warnings = [*warnings, f"{skipped} step(s) skipped: non-finite loss or gradient (on_nonfinite=skip)"]
    if not warnings:
        return ""
    return '<div class="warn">' + "<br>".join(html.escape(w) for w in warnings) + "</div>"


def _task_accuracy(groups: Mapping[str, tuple[float, float]], summary: Mapping[str, Any]) -> str:
    """The before/after task accuracy section ("" without accuracy in the summary)."""
    if not groups:
        return ""
    prompts = f" ({summary['heldout_prompts']} prompts)" if summary.get("heldout_prompts") else ""
    png = plots.plot_accuracy_before_after(groups, title="Held-out task accuracy" + prompts)
    return (
        '<h2 id="task-accuracy">Task accuracy before and after</h2><p class="about">Held-out '
        "accuracy of the verifier-checked task, before training (the starting model) and after.</p>"
        + figure("accuracy", png, "task accuracy before and after training")
    )


def _plot_sections(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """A section per `SECTIONS` entry the run logged, the other logged metrics, and a note naming
    the sections left out because the run did not log their metrics."""
    body: list[str] = []
    missing: list[str] = []
    online = any("rollout_s" in r for r in records)  # an online method's run (grpo, rloo, ...)
    other_kind = OFFLINE_ONLY if online else ONLINE_ONLY
    for sid, stitle, about, panels in SECTIONS:
        present = [p for p in panels if plots.panel_has_data(records, p)]
        if not present and sid in other_kind:
            continue  # this kind of run never logs them
        absent_keys = [
            c.key
            for p in panels
            for c in p.curves
            if not c.optional
            and c.key not in plots.panel_has_data(records, p)
            and not any(INSTEAD_OF.get(c.key, "") in r for r in records)
        ]
        if not present:
            missing.append(f"{stitle} ({', '.join(absent_keys)})")
            continue
        body.append(f'<h2 id="{sid}">{html.escape(stitle)}</h2><p class="about">{html.escape(about)}</p>')
        if absent_keys:
            body.append(f'<p class="missing">Not logged: {html.escape(", ".join(absent_keys))}.</p>')
        body.append(figure(sid, plots.plot_panels(records, present), stitle))
    body += _other_metrics(records)
    if missing:
        body.append(
            '<p class="missing">Not plotted, because the run did not log them: '
            + html.escape("; ".join(missing))
            + ".</p>"
        )
    return body


def _other_metrics(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Plots of the logged metrics no section shows (the first `MAX_OTHER_PANELS`), three a row."""
    known = {c.key for _, _, _, panels in SECTIONS for p in panels for c in p.curves} | NOT_METRICS
    others = [row[0] for row in final_metrics(records) if row[0] not in known | NOT_PLOTTED]
    if not others:
        return []
    shown = others[:MAX_OTHER_PANELS]
    body = [
        '<h2 id="other">Other logged metrics</h2><p class="about">Metrics specific to this '
        f"loss or trainer: {html.escape(', '.join(others))}.</p>"
    ]
    for i in range(0, len(shown), 3):
        chunk = [
            Panel(k, k, (Curve(k, k, plots.PALETTE[j % len(plots.PALETTE)]),))
            for j, k in enumerate(shown[i : i + 3])
        ]
        body.append(figure(f"other-{i // 3}", plots.plot_panels(records, chunk), "other metrics"))
    return body


def _tables(
    records: Sequence[Mapping[str, Any]],
    summary: Mapping[str, Any],
    config: Mapping[str, Any],
    extra: Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
) -> list[str]:
    """Final metrics, `preftune eval`'s results, the summary, the configuration and extra details."""
    body = ['<h2 id="final-metrics">Final metrics</h2>']
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
    return body


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
    groups = accuracy_groups(summary)
    body = [
        _summary_cards(records, summary, config, groups),
        findings_box(findings(records)),
        _warnings_box(records, warnings),
        _task_accuracy(groups, summary),
        *_plot_sections(records),
        *_tables(records, summary, config, extra, evaluation),
    ]
    return page(title, f"{len(records)} logged records", "".join(body))


def render_evaluation(result: Mapping[str, Any]) -> str:
    """`preftune eval`'s results (RUN/eval.json): held-out metrics of final/ and the sampled KL."""
    metrics = result.get("metrics")
    rows = list(flatten(metrics).items()) if isinstance(metrics, Mapping) else []
    kl = result.get("kl")
    if isinstance(kl, Mapping):
        rows += [(f"kl/{k}", v) for k, v in kl.items()]
    scored = result.get("metrics_objective")
    with_loss = f", scored with the {scored} loss" if scored and scored != result.get("method") else ""
    about = (
        f"preftune eval of final/ on {result.get('data', '?')} against the reference "
        f"{result.get('reference', '?')}{with_loss} (RUN/eval.json)."
    )
    return (
        '<h2 id="heldout-eval">Held-out evaluation (preftune eval)</h2>'
        f'<p class="about">{html.escape(about)}</p>' + html_table(["metric", "value"], rows)
    )


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
