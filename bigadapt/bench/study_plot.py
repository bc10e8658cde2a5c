"""The study's plot as a self-contained SVG (no plotting library): one panel per task, the task's main metric
against the training budget, a line per method, solid for 100% of the data and dashed for the smaller fractions."""
from __future__ import annotations

from xml.sax.saxutils import escape

COLORS = {"full": "#444444", "lora": "#d62728", "bitfit": "#1f77b4", "adapter_h": "#2ca02c"}
DASHES = ["", "6,4", "2,3", "8,3,2,3"]
W, H, PAD_L, PAD_B, PAD_T, PAD_R = 300, 240, 48, 36, 28, 12


def _series(rows: list[dict], task: str, metric: str) -> dict[tuple[str, float], list[tuple[float, float]]]:
    from .study import _eval_at
    out = {}
    for r in rows:
        if r["task"] == task:
            pts = [(m, _eval_at(r, m)) for m in r["marks"]]
            out[(r["method"], r["fraction"])] = [(m, e[metric]) for m, e in pts if e and metric in e]
    return out


def _panel(x0: int, task: str, metric: str, series: dict, fractions: list[float],
           baseline: float | None = None) -> list[str]:
    pts = [p for s in series.values() for p in s]
    if not pts:
        return []
    if baseline is not None:
        pts = pts + [(pts[0][0], baseline)]  # keep the reference line inside the panel
    xmax = max(x for x, _ in pts)
    ylo, yhi = min(y for _, y in pts), max(y for _, y in pts)
    ylo, yhi = (ylo - 0.05, yhi + 0.05) if yhi - ylo < 1e-9 else (ylo - 0.05 * (yhi - ylo), yhi + 0.05 * (yhi - ylo))

    def sx(x):
        return x0 + PAD_L + (W - PAD_L - PAD_R) * x / xmax

    def sy(y):
        return PAD_T + (H - PAD_T - PAD_B) * (1 - (y - ylo) / (yhi - ylo))

    el = [f'<text x="{x0 + W / 2}" y="16" text-anchor="middle" font-weight="bold">{escape(task)} ({metric})</text>',
          f'<rect x="{x0 + PAD_L}" y="{PAD_T}" width="{W - PAD_L - PAD_R}" height="{H - PAD_T - PAD_B}" '
          f'fill="none" stroke="#999"/>']
    for k in range(5):
        y = ylo + (yhi - ylo) * k / 4
        el.append(f'<text x="{x0 + PAD_L - 4}" y="{sy(y) + 4:.1f}" text-anchor="end">{y:.2f}</text>')
    for x in sorted({x for x, _ in pts}):
        el.append(f'<text x="{sx(x):.1f}" y="{H - PAD_B + 14}" text-anchor="middle">{x:g}</text>')
    el.append(f'<text x="{x0 + PAD_L + (W - PAD_L - PAD_R) / 2}" y="{H - 4}" text-anchor="middle">'
              f'training budget (s)</text>')
    if baseline is not None:
        el.append(f'<line x1="{x0 + PAD_L}" y1="{sy(baseline):.1f}" x2="{x0 + W - PAD_R}" y2="{sy(baseline):.1f}" '
                  f'stroke="#aaa" stroke-dasharray="1,3"/><text x="{x0 + W - PAD_R - 2}" y="{sy(baseline) - 3:.1f}" '
                  f'text-anchor="end" fill="#888">no skill</text>')
    for (method, fraction), s in sorted(series.items()):
        if not s:
            continue
        dash = DASHES[min(fractions.index(fraction), len(DASHES) - 1)]
        path = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in sorted(s))
        el.append(f'<polyline points="{path}" fill="none" stroke="{COLORS.get(method, "#9467bd")}" '
                  f'stroke-width="2" stroke-dasharray="{dash}"/>')
        el += [f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="2.5" fill="{COLORS.get(method, "#9467bd")}"/>'
               for x, y in s]
    return el


def plot(rows: list[dict], main_metric: dict[str, str], baselines: dict[str, float] | None = None) -> str:
    """`baselines`: a dotted reference per task (what predicting the majority class scores)."""
    tasks = [t for t in main_metric if any(r["task"] == t for r in rows)]
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    methods = sorted({r["method"] for r in rows})
    legend_h = 20 * (len(methods) + len(fractions)) + 10
    width, height = W * max(1, len(tasks)), H + legend_h
    el = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
          f'font-size="11">', f'<rect width="{width}" height="{height}" fill="white"/>']
    for i, task in enumerate(tasks):
        el += _panel(i * W, task, main_metric[task], _series(rows, task, main_metric[task]), fractions,
                     (baselines or {}).get(task))
    y = H + 14
    for m in methods:
        el.append(f'<line x1="{PAD_L}" y1="{y - 4}" x2="{PAD_L + 30}" y2="{y - 4}" stroke="{COLORS.get(m, "#9467bd")}" '
                  f'stroke-width="2"/><text x="{PAD_L + 36}" y="{y}">{escape(m)}</text>')
        y += 20
    for f in fractions:
        dash = DASHES[min(fractions.index(f), len(DASHES) - 1)]
        el.append(f'<line x1="{PAD_L}" y1="{y - 4}" x2="{PAD_L + 30}" y2="{y - 4}" stroke="#000" stroke-width="2" '
                  f'stroke-dasharray="{dash}"/><text x="{PAD_L + 36}" y="{y}">{100 * f:g}% of the training data</text>')
        y += 20
    el.append("</svg>")
    return "\n".join(el) + "\n"
