"""Heat maps with matplotlib (extra [plot]): the §7 φ grids (Figs. 3, 4) and the latency overhead grid (Fig. 5).

One panel per grid, each with labelled, 1-based axes, its own title, a shared colour bar and a figure title. The
file format follows the path's suffix (.png, .svg or .pdf); anything else gets ".png" appended.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch

from ..extras import require

FORMATS = (".png", ".svg", ".pdf")


def pyplot():
    """matplotlib.pyplot on the non-interactive Agg backend, or a one-line error naming the [plot] extra."""
    require("matplotlib", "plot", "drawing figures").use("Agg")
    return require("matplotlib.pyplot", "plot", "drawing figures")


def figure_path(path: str | Path, fmt: str | None = None) -> Path:
    """`path` with the format's suffix: `fmt` (png | svg | pdf) if given, else the path's own, else .png."""
    path = Path(path)
    if fmt:
        return path.with_name(path.name + "." + fmt.lstrip(".")) if path.suffix not in FORMATS else \
            path.with_suffix("." + fmt.lstrip("."))
    return path if path.suffix in FORMATS else path.with_name(path.name + ".png")


def heat_maps(path: str | Path, grids: dict[str, torch.Tensor], title: str, *, xlabel: str = "j", ylabel: str = "i",
              colorbar: str = "φ", vmin: float = 0.0, vmax: float = 1.0, xticks: Sequence | None = None,
              yticks: Sequence | None = None, annotate: bool = False, columns: int | None = None):
    """Write one heat map per named grid (rows = ylabel, columns = xlabel, 1-based unless ticks are given) and
    return the closed matplotlib Figure (its axes can be inspected)."""
    plt = pyplot()
    n = len(grids)
    first = next(iter(grids.values()))
    aspect = first.shape[1] / max(first.shape[0], 1)
    # wide grids (8 x 64) stack, square ones sit side by side
    columns = columns or (1 if aspect > 2 else 2 if n == 4 else min(n, 3))
    rows = -(-n // columns)
    panel_w = 4.0 if aspect <= 2 else 9.0
    panel_h = max(1.6, min(4.0, panel_w / aspect + 1.0))
    fig, axes = plt.subplots(rows, columns, figsize=(max(panel_w * columns + 1.4, 6.0), panel_h * rows + 0.9),
                             squeeze=False, constrained_layout=True)
    image = None
    for ax, (name, grid) in zip(axes.flat, grids.items()):
        g = grid.detach().float().cpu().numpy()
        image = ax.imshow(g, cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto", interpolation="nearest")
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        _ticks(ax.set_xticks, ax.set_xticklabels, g.shape[1], xticks)
        _ticks(ax.set_yticks, ax.set_yticklabels, g.shape[0], yticks)
        if annotate:
            for (i, j), v in _cells(g):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", fontsize=8,
                        color="white" if v < vmin + 0.6 * (vmax - vmin) else "black")
    for ax in list(axes.flat)[n:]:
        ax.set_visible(False)
    fig.colorbar(image, ax=axes.ravel().tolist(), label=colorbar, shrink=0.9)
    fig.suptitle(title)
    out = figure_path(path)
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return fig


def _ticks(set_ticks, set_labels, size: int, labels: Sequence | None) -> None:
    """Given labels, or 1-based indices (at most ~8 ticks, always including the first and the last)."""
    if labels is not None:
        set_ticks(range(size))
        set_labels([str(x) for x in labels])
        return
    step = max(1, -(-size // 8))
    positions = sorted(set(range(0, size, step)) | {size - 1})
    if size > 1 and len(positions) > 2 and positions[-1] - positions[-2] < step / 2:
        positions.pop(-2)
    set_ticks(positions)
    set_labels([str(p + 1) for p in positions])


def _cells(g):
    for i in range(g.shape[0]):
        for j in range(g.shape[1]):
            yield (i, j), float(g[i, j])
