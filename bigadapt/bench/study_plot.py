"""The study's plot with matplotlib (extra [plot]): one panel per task, the task's main metric against the training
budget, a line per method (colour), solid for 100% of the data and dashed for the smaller fractions (line style).
With several seeds of a cell the line is their mean and a band spans their min..max."""
from __future__ import annotations

import io
import statistics
from pathlib import Path

COLORS = {"full": "#444444", "lora": "#d62728", "bitfit": "#1f77b4", "adapter_h": "#2ca02c"}
STYLES = ["-", "--", ":", "-."]


def _series(rows: list[dict], task: str, metric: str) -> dict[tuple[str, float], dict[float, list[float]]]:
    """{(method, fraction): {budget: [value per seed]}}."""
    from .study import _eval_at
    out: dict = {}
    for r in rows:
        if r["task"] == task:
            cell = out.setdefault((r["method"], r["fraction"]), {})
            for m in r["marks"]:
                e = _eval_at(r, m)
                if e and metric in e:
                    cell.setdefault(m, []).append(e[metric])
    return out


def figure(rows: list[dict], main_metric: dict[str, str], baselines: dict[str, float] | None = None):
    """The matplotlib Figure; `baselines`: a dotted reference per task (what predicting the majority class scores)."""
    from ..analysis.heatmap import pyplot
    plt = pyplot()
    tasks = [t for t in main_metric if any(r["task"] == t for r in rows)] or ["(no runs)"]
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    seeds = len({r.get("seed", 0) for r in rows})
    # at least 7 inches: one panel alone must still hold the title and a legend row of ~3 entries
    width = max(7.0, 4.2 * len(tasks))
    fig, axes = plt.subplots(1, len(tasks), figsize=(width, 4.0), squeeze=False, constrained_layout=True)
    for ax, task in zip(axes[0], tasks):
        metric = main_metric.get(task, "")
        for (method, fraction), cell in sorted(_series(rows, task, metric).items()):
            if not cell:
                continue
            xs = sorted(cell)
            color = COLORS.get(method, "#9467bd")
            style = STYLES[min(fractions.index(fraction), len(STYLES) - 1)]
            ax.plot(xs, [statistics.mean(cell[x]) for x in xs], style, color=color, marker="o", markersize=3,
                    label=f"{method}, {100 * fraction:g}% data")
            if any(len(cell[x]) > 1 for x in xs):
                ax.fill_between(xs, [min(cell[x]) for x in xs], [max(cell[x]) for x in xs], color=color, alpha=0.15,
                                linewidth=0)
        if baselines and task in baselines:
            ax.axhline(baselines[task], color="#999999", linestyle=(0, (1, 3)), label="no skill")
        ax.set_title(f"{task} ({metric})")
        unit = next((r.get("unit", "s") for r in rows if r["task"] == task), "s")
        ax.set_xlabel("training budget (optimizer steps)" if unit == "steps" else "training budget (s)")
        ax.set_ylabel(metric)
        ax.grid(alpha=0.3)
    legend: dict = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), int(width / 2.3)), fontsize=8)
    per_line = {len({r.get("seed", 0) for r in rows if (r["task"], r["method"], r["fraction"]) == key})
                for key in {(r["task"], r["method"], r["fraction"]) for r in rows}} or {1}
    counts = f"{seeds}" if len(per_line) == 1 else f"{min(per_line)}–{max(per_line)}"
    spread = f"mean of {counts} seeds per line, band min..max" if seeds > 1 else "one seed"
    fig.suptitle(f"Main metric vs training budget ({spread})", fontsize=11)
    return fig


def write_plot(path: str | Path, rows: list[dict], main_metric: dict[str, str],
               baselines: dict[str, float] | None = None) -> Path:
    """Write the plot; the format follows the suffix (.png, .svg, .pdf; anything else gets .png)."""
    from ..analysis.heatmap import figure_path, pyplot
    fig, out = figure(rows, main_metric, baselines), figure_path(path)
    fig.savefig(out, dpi=120)
    pyplot().close(fig)
    return out


def plot(rows: list[dict], main_metric: dict[str, str], baselines: dict[str, float] | None = None) -> str:
    """The plot as SVG text."""
    from ..analysis.heatmap import pyplot
    fig, buf = figure(rows, main_metric, baselines), io.StringIO()
    fig.savefig(buf, format="svg")
    pyplot().close(fig)
    return buf.getvalue()
