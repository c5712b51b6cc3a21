"""PNG plots for run and sweep reports, drawn with matplotlib's Agg canvas (no display, no pyplot state).

Every function returns PNG bytes, so a report can embed them as base64 and stay one self-contained file.
Noisy train curves are drawn twice: raw values faint, a centred moving average on top; eval points
are drawn on the same axes in the same colour with markers, so over-fitting shows as the two lines parting.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import matplotlib

matplotlib.use("Agg")  # before any figure is made: reports are written on machines without a display

from matplotlib.artist import Artist  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

Record = Mapping[str, object]

# One colour per concept across every plot: chosen green, rejected red, margin/other blue.
CHOSEN, REJECTED, NEUTRAL, SECOND = "#2a9d8f", "#d1495b", "#3d5a98", "#e9a03b"
PALETTE = ("#3d5a98", "#d1495b", "#2a9d8f", "#e9a03b", "#7b4b94", "#5c946e", "#c05f2a", "#4f4f4f")
DPI = 110


@dataclass(frozen=True)
class Curve:
    """One metric drawn in a panel: `key` in metrics.jsonl, its legend `label` and `color`.

    `smooth=False` for deterministic series (the learning-rate schedule), which an average would distort.
    `optional=True` for a metric only some methods log: its absence is not reported as missing.
    """

    key: str
    label: str
    color: str = NEUTRAL
    smooth: bool = True
    optional: bool = False


@dataclass(frozen=True)
class Panel:
    """One axes: the curves it draws, its title and y label (with units), optional chance/zero line."""

    title: str
    ylabel: str
    curves: tuple[Curve, ...]
    hline: float | None = None
    ylim: tuple[float, float] | None = None
    log_y: bool = False


MARKERS = "osD^v"  # scatter shapes, one per round of the palette


def method_colors(names: Sequence[str]) -> dict[str, str]:
    """One palette colour per name, in order (cycling after eight)."""
    return {name: PALETTE[i % len(PALETTE)] for i, name in enumerate(names)}


def metric_series(records: Sequence[Record], key: str, split: str) -> tuple[list[float], list[float]]:
    """Steps and values of `key` in records of `split`, skipping absent, non-numeric and non-finite values."""
    steps: list[float] = []
    values: list[float] = []
    for rec in records:
        if rec.get("split", "train") != split:
            continue
        value, step = rec.get(key), rec.get("step")
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            continue
        if isinstance(step, bool) or not isinstance(step, int | float):
            continue
        steps.append(float(step))
        values.append(float(value))
    return steps, values


def smooth(values: Sequence[float], half_window: int) -> list[float]:
    """Centred moving average: s_i = mean(v_j for |j − i| ≤ half_window), the window clipped at the ends.

    Centred rather than an exponential average because a report is drawn after the fact: an EMA lags
    the raw curve by its window, which would misplace trends and understate the final values.
    """
    if half_window <= 0:
        return list(values)
    prefix = [0.0]
    for v in values:
        prefix.append(prefix[-1] + v)
    n = len(values)
    out = []
    for i in range(n):
        lo, hi = max(0, i - half_window), min(n, i + half_window + 1)
        out.append((prefix[hi] - prefix[lo]) / (hi - lo))
    return out


def smoothing_window(n: int) -> int:
    """Half-width of the moving average for n points: about n/30 (none for fewer than 12 points)."""
    return 0 if n < 12 else max(1, n // 30)


def _style(ax: Axes, title: str, xlabel: str, ylabel: str, grid: str = "both") -> None:
    if xlabel == "optimizer step":  # steps are whole numbers, also on a run of 5 steps
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize=11, loc="left", fontweight="bold")
    ax.set_xlabel(xlabel, fontsize=9)
    ax.set_ylabel(ylabel, fontsize=9)
    ax.set_axisbelow(True)  # grid lines behind bars and curves
    ax.grid(True, axis=grid, alpha=0.3, linewidth=0.6)  # type: ignore[arg-type]
    ax.tick_params(labelsize=8)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _png(fig: Figure) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", facecolor="white")
    return buf.getvalue()


def panel_has_data(records: Sequence[Record], panel: Panel) -> list[str]:
    """Keys of `panel` with at least one value in `records` (any split)."""
    return [
        c.key for c in panel.curves if any(metric_series(records, c.key, s)[1] for s in ("train", "eval"))
    ]


def _draw_panel(ax: Axes, records: Sequence[Record], panel: Panel) -> None:
    for curve in panel.curves:
        steps, values = metric_series(records, curve.key, "train")
        if values:
            half = smoothing_window(len(values)) if curve.smooth else 0
            if half > 0:
                ax.plot(steps, values, color=curve.color, alpha=0.2, linewidth=0.8)
                ax.plot(
                    steps,
                    smooth(values, half),
                    color=curve.color,
                    linewidth=1.8,
                    label=f"{curve.label} (train, smoothed)",
                )
            else:
                ax.plot(
                    steps,
                    values,
                    color=curve.color,
                    linewidth=1.6,
                    marker="." if len(values) < 60 else None,
                    markersize=4,
                    label=f"{curve.label} (train)",
                )
        e_steps, e_values = metric_series(records, curve.key, "eval")
        if e_values:
            ax.plot(
                e_steps,
                e_values,
                color=curve.color,
                linewidth=1.2,
                linestyle="--",
                marker="o",
                markersize=4.5,
                markerfacecolor="white",
                markeredgewidth=1.4,
                label=f"{curve.label} (eval)",
            )
    drawn = [float(v) for line in ax.get_lines() for v in line.get_ydata()]  # type: ignore[union-attr,arg-type]
    if panel.log_y and drawn and min(drawn) > 0:
        ax.set_yscale("log")
    else:
        ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 5), useOffset=False)
    if panel.hline is not None:
        ax.axhline(panel.hline, color="#888888", linewidth=0.9, linestyle=":", zorder=0)
    if panel.ylim is not None:
        ax.set_ylim(*panel.ylim)
    _style(ax, panel.title, "optimizer step", panel.ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7.5, frameon=False, loc="best")


def plot_panels(records: Sequence[Record], panels: Sequence[Panel]) -> bytes:
    """Draw `panels` side by side (one row) from metrics records; returns PNG bytes."""
    n = len(panels)
    fig = Figure(figsize=(8.6 if n == 1 else 5.0 * n, 3.7))
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, panel in zip(axes, panels):
        _draw_panel(ax, records, panel)
    fig.tight_layout()
    return _png(fig)


def plot_accuracy_before_after(groups: Mapping[str, tuple[float, float]], *, title: str) -> bytes:
    """Grouped bars of task accuracy before and after training, one group per decoding mode.

    `groups` maps a mode name ("greedy", "sampled") to (before, after), each a fraction in [0, 1].
    """
    fig = Figure(figsize=(6.4, 3.7))
    ax = fig.subplots()
    names = list(groups)
    width = 0.36
    for offset, idx, label, color in ((-width / 2, 0, "before", "#9aa5b1"), (width / 2, 1, "after", NEUTRAL)):
        xs = [i + offset for i in range(len(names))]
        vals = [100.0 * groups[name][idx] for name in names]
        bars = ax.bar(xs, vals, width=width * 0.95, color=color, label=label)
        ax.bar_label(bars, labels=[f"{v:.1f}%" for v in vals], fontsize=8, padding=2)
    ax.set_xticks(range(len(names)), names)
    ax.set_ylim(0, 109)
    _style(ax, title, "decoding", "held-out accuracy (%)", grid="y")
    ax.legend(fontsize=8, frameon=False, loc="upper left", ncols=2)
    fig.tight_layout()
    return _png(fig)


def bar_axis_range(values: Sequence[float], *, pad: float = 0.2, least: float = 1.0) -> tuple[float, float]:
    """The value axis of a bar chart, from the data: the span of `values` (0, where the bars start, when
    it lies within reach) widened by `pad` of it on each side and at least `least` units, so that a
    difference of a point between two bars shows and the value labels above them fit."""
    lo, hi = min(values), max(values)
    margin = max(pad * (hi - lo), least)
    low, high = lo - margin, hi + margin
    if lo >= 0 and lo <= 2 * (hi - lo):  # bars that start near 0 start at 0
        low = 0.0
    if hi <= 0 and -hi <= 2 * (hi - lo):
        high = 0.0
    return low, high


def plot_method_bars(
    values: Mapping[str, float],
    *,
    title: str,
    ylabel: str,
    percent: bool = False,
    baseline: float | None = None,
    baseline_label: str = "before training",
    colors: Mapping[str, str] | None = None,
    errors: Mapping[str, float] | None = None,
    labels: Mapping[str, str] | None = None,
) -> bytes:
    """One bar per method (a sweep), value labels on the bars, an optional dashed baseline line.

    `colors` maps a method to its colour, so one method has one colour in every plot of a report;
    `errors` adds ±1 standard-error whiskers; `labels` replaces the value printed at a bar. The value
    axis spans the data and the baseline (`bar_axis_range`), not a fixed 0–100 %; where it does not
    start at 0 its label says so. More than six methods are drawn as horizontal bars, one row each,
    so that names and labels stay readable.
    """
    names = list(values)
    horizontal = len(names) > 6
    size = (8.0, 0.34 * len(names) + 1.6) if horizontal else (max(5.0, 0.9 * len(names) + 2.5), 3.9)
    fig = Figure(figsize=size)
    ax = fig.subplots()
    scale = 100.0 if percent else 1.0
    vals = [scale * values[n] for n in names]
    colors = colors or method_colors(names)
    err = [scale * errors.get(n, 0.0) for n in names] if errors else None
    style = {"color": [colors[n] for n in names], "capsize": 4,
             "error_kw": {"elinewidth": 1.0, "ecolor": "#333333"}}  # fmt: skip
    if horizontal:
        bars = ax.barh(range(len(names)), vals, xerr=err, **style)  # type: ignore[arg-type]
        ax.invert_yaxis()  # the first method on top, as in the table
    else:
        bars = ax.bar(range(len(names)), vals, yerr=err, **style)  # type: ignore[arg-type]
    text = [labels[n] if labels else (f"{v:.1f}%" if percent else f"{v:.3g}") for n, v in zip(names, vals)]
    ax.bar_label(bars, labels=text, fontsize=8, padding=2)
    shown = vals + [v + e for v, e in zip(vals, err or [])] + [v - e for v, e in zip(vals, err or [])]
    if baseline is not None:
        shown.append(scale * baseline)
        line = ax.axvline if horizontal else ax.axhline
        line(scale * baseline, color="#444444", linestyle="--", linewidth=1.0,
             label=f"{baseline_label}: {scale * baseline:.1f}{'%' if percent else ''}")  # fmt: skip
        ax.legend(fontsize=8, frameon=False, loc="best")
    low, high = bar_axis_range(shown, least=1.0 if percent else 0.05 * max(1e-9, max(map(abs, shown))))
    if high <= low:  # every value equal (all zero: nothing learnt): an axis of unit span above them
        high = low + (abs(low) * 0.1 or 1.0)
    if horizontal:  # room for the labels right of the bars
        high += 0.25 * (high - low) if high > 0 else 0.0
        low -= 0.25 * (high - low) if low < 0 else 0.0
    if low > 0:
        ylabel += f" — axis from {low:.3g}{'%' if percent else ''}"
    (ax.set_xlim if horizontal else ax.set_ylim)(low, high)
    if low < 0:  # negative values: the zero line they hang from
        (ax.axvline if horizontal else ax.axhline)(0.0, color="#444444", linewidth=0.8)
    (ax.set_yticks if horizontal else ax.set_xticks)(range(len(names)), names)
    if horizontal:
        _style(ax, title, ylabel, "method", grid="x")
    else:
        _style(ax, title, "method", ylabel, grid="y")
    fig.tight_layout()
    return _png(fig)


def plot_kl_vs_accuracy(
    points: Mapping[str, tuple[float, float, float]],
    *,
    baseline: float | None,
    colors: Mapping[str, str] | None = None,
) -> bytes:
    """Scatter of held-out accuracy against KL to the reference, one point per method (named in the legend).

    `points` maps a method to (kl_nats, kl_stderr, accuracy in [0, 1]); error bars are ±1 standard error.
    Up and to the left is better: more accuracy for less drift from the reference. Names go in a
    legend rather than next to the points, where methods with similar results would overprint.
    """
    fig = Figure(figsize=(7.4, 4.2))
    ax = fig.subplots()
    colors = colors or method_colors(list(points))
    order = list(colors)  # a method's place in the palette sets its shape: colours repeat after eight
    for name, (kl, err, acc) in points.items():
        place = order.index(name) if name in order else 0
        ax.errorbar(
            [kl],
            [100 * acc],
            xerr=[err],
            fmt=MARKERS[(place // len(PALETTE)) % len(MARKERS)],
            color=colors[name],
            markersize=7,
            capsize=3,
            label=f"{name}: {100 * acc:.1f}%, KL {kl:.3g}",
        )
    if baseline is not None:
        ax.axhline(
            100 * baseline,
            color="#444444",
            linestyle="--",
            linewidth=1.0,
            label=f"reference model: {100 * baseline:.1f}%",
        )
    ax.axvline(0.0, color="#888888", linestyle=":", linewidth=0.9, zorder=0)
    shown = [100 * acc for _, _, acc in points.values()] + ([100 * baseline] if baseline is not None else [])
    ax.set_ylim(max(0.0, min(shown) - 10), min(105.0, max(shown) + 10))  # a few points apart stay visible
    _style(
        ax,
        "Accuracy vs. drift from the reference",
        "KL(policy ‖ reference), nats per response (± 1 s.e.)",
        "held-out accuracy (%)",
    )
    ax.legend(fontsize=8, frameon=False, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    return _png(fig)


def plot_runs_overlay(
    runs: Mapping[str, Sequence[Record]],
    panels: Sequence[tuple[str, str, str, bool]],
    colors: Mapping[str, str] | None = None,
) -> bytes:
    """Overlay one smoothed train curve per method in each panel.

    `panels` holds (metrics key, title, y label, normalise): with normalise, each curve is divided by
    the mean of its first 5% of values, so losses of different scales (IPO's 1/(4β²) vs DPO's log 2)
    share one axis as "fraction of the starting loss".
    """
    colors = colors or method_colors(list(runs))
    cols = min(2, len(panels))  # two panels a row: four side by side shrink to unreadable on a page
    rows = math.ceil(len(panels) / cols)
    fig = Figure(figsize=(5.4 * cols, 3.5 * rows))
    grid = fig.subplots(rows, cols, squeeze=False)
    axes = [ax for row in grid for ax in row]
    for ax in axes[len(panels) :]:
        ax.set_visible(False)
    for ax, (key, title, ylabel, normalise) in zip(axes, panels):
        for name, records in runs.items():
            steps, values = metric_series(records, key, "train")
            if not values:
                continue
            if normalise:
                head = values[: max(1, len(values) // 20)]
                start = sum(head) / len(head)
                if abs(start) > 1e-12:
                    values = [v / start for v in values]
            place = list(colors).index(name) if name in colors else 0
            ax.plot(
                steps,
                smooth(values, smoothing_window(len(values))),
                color=colors[name],
                linestyle=("-", "--", ":")[(place // len(PALETTE)) % 3],  # colours repeat after eight
                linewidth=1.7,
                marker="." if len(values) <= 30 else None,
                label=name,
            )
        _style(ax, title, "optimizer step", ylabel)
        if not ax.get_legend_handles_labels()[0]:
            ax.text(0.5, 0.5, "no method logged this", ha="center", va="center", color="#59636e",
                    fontsize=9, transform=ax.transAxes)  # fmt: skip
    handles: dict[str, Artist] = {}  # one legend for the figure, under the panels: none covers a curve
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            handles.setdefault(label, handle)
    fig.tight_layout()
    if handles:
        fig.legend(
            list(handles.values()), list(handles), loc="upper center", bbox_to_anchor=(0.5, 0.0),
            ncols=min(len(handles), 7), frameon=False, fontsize=8.5, title="method", title_fontsize=8.5,
        )  # fmt: skip
    return _png(fig)
