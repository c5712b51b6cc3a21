"""The comparison report of a sweep: OUT/sweep.json (machine-readable) and OUT/sweep.html (for people)."""

from __future__ import annotations

import html
import math
from pathlib import Path
from typing import Any

from preftune.eval import plots
from preftune.eval.htmlkit import cards, figure, findings_box, fmt, html_table, page, write_atomic
from preftune.eval.report import read_metrics
from preftune.eval.sweep import MethodResult, SweepResult, write_sweep_json

# (column title, key in MethodResult.metrics, shown in %): final train values and the final evaluation's.
# Each table shows only the columns some of its methods logged, so it fits a page.
PAIR_COLUMNS = (
    ("train loss", "loss", False),
    ("eval loss", "eval/loss", False),
    ("eval reward acc.", "eval/rewards/accuracy", True),
    ("eval margin β·h", "eval/rewards/margin", False),
    ("eval log p chosen /tok", "eval/logps/chosen_per_token", False),
    ("eval log p rejected /tok", "eval/logps/rejected_per_token", False),
    ("eval ranking acc.", "eval/policy_rank_accuracy", True),
)
ONLINE_COLUMNS = (  # online methods (grpo, rloo, ...): the last step's samples
    ("train loss", "loss", False),
    ("sample reward", "reward", False),
    ("sample acc.", "accuracy", True),
    ("KL to ref. (train)", "kl", False),
    ("zero-signal frac.", "zero_signal_fraction", True),
)
ONLINE_KEYS = ("reward", "zero_signal_fraction")  # a run that logs one of these sampled online


def _cell(value: float | None, percent: bool = False) -> str:
    if value is None or not math.isfinite(value):
        return "–"
    return f"{100 * value:.1f}%" if percent else fmt(value)


def comparison_rows(
    results: list[MethodResult], metric: str = "accuracy"
) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the outcome table: status, steps, time, task accuracy or `metric`, KL and
    how the run got its reference."""
    header = ["method", "status", "steps", "wall (s)", "CPU (s)", f"task {metric}", "KL to ref. (nats)"]
    header.append("reference")
    rows = []
    for r in results:
        kl = f"{r.kl['mean']:.3g} ± {r.kl['stderr']:.2g}" if r.kl else "–"
        status = r.status if not r.eval_error else f"{r.status} (eval failed)"
        rows.append(
            [r.method, status, str(r.steps), f"{r.seconds:.0f}", f"{r.cpu_seconds:.0f}"]
            + [_cell(r.accuracy, percent=metric == "accuracy"), kl, r.reference_cache]
        )
    return header, rows


def metric_tables(results: list[MethodResult]) -> list[tuple[str, list[str], list[list[str]]]]:
    """(title, header, rows) of the final training metrics: one table for the preference-pair methods,
    one for the online ones, each with the columns its methods logged (none: no table)."""
    online = [r for r in results if any(k in r.metrics for k in ONLINE_KEYS)]
    pairs = [r for r in results if r.metrics and r not in online]
    tables = []
    for title, group, columns in (
        ("preference-pair methods", pairs, PAIR_COLUMNS),
        ("online methods (the last step's samples)", online, ONLINE_COLUMNS),
    ):
        shown = [(t, k, pct) for t, k, pct in columns if any(k in r.metrics for r in group)]
        if group and shown:
            rows = [[r.method] + [_cell(r.metrics.get(k), percent=pct) for _, k, pct in shown] for r in group]
            tables.append((title, ["method"] + [t for t, _, _ in shown], rows))
    return tables


def _run_records(result: SweepResult) -> dict[str, list[dict[str, Any]]]:
    runs = {}
    for r in result.results:
        path = Path(r.run_dir) / "metrics.jsonl"
        if path.is_file():
            try:
                runs[r.method] = read_metrics(path)[0]
            except Exception:  # a run that died before logging has no curve; the table already says so
                continue
    return runs


def sweep_findings(result: SweepResult, runs: dict[str, list[dict[str, Any]]]) -> list[str]:
    """One-line conclusions: the best method against the starting model, and over-optimised runs."""
    from preftune.eval.diagnose import findings

    notes = []
    acc = {r.method: r.accuracy for r in result.results if r.status == "ok" and r.accuracy is not None}
    if acc:
        best = max(acc, key=lambda m: acc[m])
        name, shown = result.task_metric, _task_value(result, acc[best])
        if result.baseline_accuracy is not None:
            verdict = "above" if acc[best] > result.baseline_accuracy else "not above"
            notes.append(
                f"Best held-out {name}: {best} with {shown}, {verdict} the starting "
                f"model's {_task_value(result, result.baseline_accuracy)}."
            )
        else:
            notes.append(f"Best held-out {name}: {best} with {shown}.")
    over = [m for m, recs in runs.items() if any(n.startswith("Over-optimisation") for n in findings(recs))]
    if over:
        notes.append(
            "Over-optimisation signature (the chosen responses' log-probability falls while the margin "
            f"grows) in: {', '.join(over)} — see each run's report; a lower lr, fewer steps or an SFT "
            "term usually helps."
        )
    return notes


def _task_value(result: SweepResult, value: float) -> str:
    """A task score as the report shows it: accuracy in %, another metric as a number."""
    return f"{100 * value:.1f}%" if result.task_metric == "accuracy" else f"{value:.4f}"


def _sweep_cards(result: SweepResult, ok: list[MethodResult]) -> str:
    """Methods trained, wall time, who computed the reference pass, the starting model's accuracy."""
    data = result.to_json()["reference_cache"]
    items = [
        ("methods trained", f"{len(ok)} of {len(result.results)}"),
        ("wall time", f"{result.seconds:.0f} s"),
        ("reference pass computed by", ", ".join(data["computed_by"]) or "none (all cached)"),
    ]
    if result.baseline_accuracy is not None:
        items.append((f"reference model {result.task_metric}", _task_value(result, result.baseline_accuracy)))
    return cards(items)


def _failures(result: SweepResult) -> str:
    """The methods that failed to train or to evaluate, with their errors ("" when none did)."""
    failed = [r for r in result.results if r.status == "failed"]
    if not failed and not any(r.eval_error for r in result.results):
        return ""
    items = [f"<li><b>{html.escape(r.method)}</b>: {html.escape(r.error or '')}</li>" for r in failed]
    items += [
        f"<li><b>{html.escape(r.method)}</b> (evaluation): {html.escape(r.eval_error)}</li>"
        for r in result.results
        if r.eval_error
    ]
    return f'<h2 id="failures">Failures</h2><ul class="err">{"".join(items)}</ul>'


def stopped_notice(result: SweepResult) -> str:
    """A sweep a signal stopped: what finished, what was interrupted (its checkpoint), what did not
    start, and how to go on ("" for a sweep that ran to its end)."""
    if not result.stopped:
        return ""
    return (
        f'<div class="warn" id="stopped"><b>Stopped before its end.</b> {html.escape(result.stopped)}. '
        "Run the same <code>preftune sweep</code> command with <code>--resume</code> to go on: the "
        "finished methods are kept, the interrupted one resumes from its checkpoint.</div>"
    )


def _comparison(result: SweepResult) -> list[str]:
    """The per-method tables, how to read them, and links to the runs' own reports."""
    header, rows = comparison_rows(result.results, result.task_metric)
    measured = (
        "No held-out task was given, so task accuracy and KL were not measured. "
        if result.task_name == "none"
        else f"Task accuracy and KL are measured on {html.escape(result.task_name)}: KL(π_θ ‖ π_ref) is a "
        "Monte-Carlo estimate from policy samples (temperature 1), ± one standard error. "
    )
    body = [
        f'<h2 id="comparison">Results per method</h2><p class="about">{measured}"reused" in the reference '
        "column means the run read its reference log-probs from the shared cache without computing any; "
        'the time of a run marked "computed" includes that reference pass.</p>',
        html_table(header, rows),
    ]
    tables = metric_tables(result.results)
    if tables:
        body.append(
            '<h2 id="metrics">Final training metrics</h2><p class="about">Train values are the last '
            "step's; eval values come from the final evaluation on held-out pairs.</p>"
        )
    for title, header, rows in tables:
        body.append(f"<h3>{html.escape(title[0].upper() + title[1:])}</h3>" + html_table(header, rows))
    links = [
        f'<a href="{html.escape(r.method)}/report.html">{html.escape(r.method)}</a>'
        for r in result.results
        if (Path(r.run_dir) / "report.html").is_file()
    ]
    if links:
        body.append(f"<p>Per-run reports: {' · '.join(links)}</p>")
    return body


def settings_tables(result: SweepResult) -> str:
    """The configuration every method shares, then the settings the methods do not share (an online
    method's prompts, reward and schedule against a pair method's data and schedule), each method's
    own value of each (a pair method's row leaves out what only online methods read, such as
    num_generations); methods with the same values share a row."""
    from preftune.config_fields import online_only_fields
    from preftune.online_methods import is_online

    own = sorted({k for r in result.results for k in r.settings})
    shared = [(k, v) for k, v in result.config.items() if v not in (None, "", [], {}) and k not in own]
    online_only = online_only_fields()
    groups: dict[str, list[str]] = {}
    for r in result.results:
        keys = [k for k in own if k in r.settings or is_online(r.method) or k not in online_only]
        values = {k: r.settings.get(k, result.config.get(k)) for k in keys}
        text = "; ".join(f"{k} = {fmt(v)}" for k, v in values.items() if v not in (None, "", [], {}))
        groups.setdefault(text, []).append(r.method)
    parts = ['<h2 id="config">Configuration</h2>']
    if own:
        rows = [[", ".join(methods), text or "–"] for text, methods in groups.items()]
        parts.append(
            '<p class="about">Settings the methods do not share: an online method trains on prompts '
            "with a reward and its own schedule (steps, batch, learning rate, samples per prompt), a "
            "preference-pair method on the pairs with the offline one.</p>"
            + html_table(["methods", "their settings"], rows)
            + "<h3>Shared by every method</h3>"
        )
    parts.append(html_table(["key", "value"], shared))
    return "".join(parts)


def _bars(sid: str, title: str, values: dict[str, float], alt: str, **style: Any) -> str:
    """A section of one bar per method: `title` as its heading and `style` for `plot_method_bars`."""
    png = plots.plot_method_bars(values, title=f"{title} per method", **style)
    return f'<h2 id="{sid}">{title}</h2>' + figure(sid, png, alt)


def _task_bars(result: SweepResult, accuracy: dict[str, float], colors: dict[str, str]) -> str:
    """The held-out task score per method. With the reference model's score: each bar is the change
    from it (accuracy in points), labelled with the score itself, since differences of a point on bars
    drawn from 0 to 100 % look flat; without: the score, on an axis that spans the data."""
    name, base = result.task_metric, result.baseline_accuracy
    percent = name == "accuracy"
    if base is None:
        return _bars(
            "accuracy", f"Held-out task {name}", accuracy, f"task {name} per method",
            ylabel=f"held-out {name}" + (" (%)" if percent else ""), percent=percent, colors=colors,
        )  # fmt: skip
    change, labels = task_change(accuracy, base, percent)
    shown = f"{100 * base:.1f}%" if percent else f"{base:.4f}"
    unit = "points" if percent else name
    return _bars(
        "accuracy", f"Held-out task {name}: change from the reference model ({shown})", change,
        f"change in task {name} per method", ylabel=f"held-out {name} − reference model's ({unit})",
        colors=colors, labels=labels,
    )  # fmt: skip


def task_change(
    score: dict[str, float], base: float, percent: bool
) -> tuple[dict[str, float], dict[str, str]]:
    """Each method's change from the reference model's score (in points when `percent`) and its bar
    label: the score and the signed change ("63.4% (+14.3)")."""
    scale = 100.0 if percent else 1.0
    change = {m: scale * (v - base) for m, v in score.items()}
    if percent:
        return change, {m: f"{100 * score[m]:.1f}% ({change[m]:+.1f})" for m in score}
    return change, {m: f"{score[m]:.4f} ({change[m]:+.4f})" for m in score}


def _method_plots(result: SweepResult, ok: list[MethodResult], colors: dict[str, str]) -> list[str]:
    """Task accuracy, accuracy against KL (or KL alone) and reward accuracy, one bar or point per method."""
    body = []
    accuracy = {r.method: r.accuracy for r in ok if r.accuracy is not None}
    kl = {r.method: r.kl for r in ok if r.kl}
    if accuracy:
        body.append(_task_bars(result, accuracy, colors))
    if accuracy and kl:
        points = {m: (kl[m]["mean"], kl[m]["stderr"], accuracy[m]) for m in accuracy if m in kl}
        png = plots.plot_kl_vs_accuracy(points, baseline=result.baseline_accuracy, colors=colors)
        body.append(
            '<h2 id="kl-accuracy">Accuracy against KL to the reference</h2><p class="about">Up and to the '
            "left is better: more accuracy for less drift from the starting model.</p>"
            + figure("kl-accuracy", png, "KL vs accuracy")
        )
    elif kl:
        body.append('<h2 id="kl">KL to the reference</h2>')
        png = plots.plot_method_bars(
            {m: v["mean"] for m, v in kl.items()},
            title="KL(policy ‖ reference) per method",
            ylabel="nats per response (± 1 s.e.)",
            colors=colors,
            errors={m: v["stderr"] for m, v in kl.items()},
        )
        body.append(figure("kl", png, "KL per method"))
    reward_acc = {
        r.method: r.metrics["eval/rewards/accuracy"] for r in ok if "eval/rewards/accuracy" in r.metrics
    }
    if reward_acc:
        body.append(
            _bars(
                "reward-accuracy",
                "Held-out reward accuracy",
                reward_acc,
                "reward accuracy per method",
                ylabel="fraction of pairs (%)",
                percent=True,
                baseline=0.5,
                baseline_label="chance",
                colors=colors,
            )
        )
    return body


def _curves(runs: dict[str, list[dict[str, Any]]], colors: dict[str, str]) -> str:
    """Every method's smoothed train curves overlaid ("" when no run logged any)."""
    if not runs:
        return ""
    panels = [
        ("loss", "Loss (relative to its start)", "loss / initial loss", True),
        ("rewards/accuracy", "Reward accuracy (train)", "fraction of pairs", False),
        ("logps/chosen_per_token", "Chosen log-probability", "nats per token", False),
    ]
    if any(any("reward" in r for r in records) for records in runs.values()):  # online methods ran
        panels.append(("reward", "Sample reward (online methods)", "mean reward per completion", False))
    return (
        '<h2 id="curves">Training curves</h2><p class="about">Smoothed train curves of every method. '
        "Losses have different scales (IPO's starts at 1/(4β²), DPO's at log 2), so each is divided by "
        "its starting value. Log-probabilities are per token and directly comparable: a method whose "
        "chosen log-probability falls fastest is pushing all responses down.</p>"
        + figure("curves", plots.plot_runs_overlay(runs, panels, colors), "training curves per method")
    )


def build_sweep_html(result: SweepResult) -> str:
    """The sweep page: summary cards, failures, the comparison table, comparison plots, the shared config."""
    ok = [r for r in result.results if r.status == "ok"]
    runs = _run_records(result)
    colors = plots.method_colors([r.method for r in result.results])
    body = [
        _sweep_cards(result, ok),
        stopped_notice(result),
        _failures(result),
        findings_box(sweep_findings(result, runs)),
        *_comparison(result),
        *_method_plots(result, ok, colors),
        _curves(runs, colors),
        settings_tables(result),
    ]
    methods = ", ".join(r.method for r in result.results)
    return page(
        f"preftune sweep: {methods}", f"{len(result.results)} methods · {result.out_dir}", "".join(body)
    )


def write_sweep(result: SweepResult) -> tuple[Path, Path]:
    """Write OUT/sweep.json and OUT/sweep.html; return their paths."""
    json_path = write_sweep_json(result)
    html_path = result.out_dir / "sweep.html"
    write_atomic(html_path, build_sweep_html(result))
    return json_path, html_path
