"""Intervals for the ratios the launched benchmarks report (`bench peft`), and when a target counts as met.

Each round launches every side back to back, so a round's ratio (side a's median step / side b's) is paired:
the machine's slow drift moves both alike and cancels in it. The interval is over those per-round ratios, a
Student t interval on their logarithms: a ratio and its inverse then get mirrored intervals, and a ratio is
positive and skewed (a round that doubles a side's time moves the ratio more above 1 than below). Its point
is the geometric mean of the rounds. A target counts as met only when the interval's upper end is under it.

The t quantile is computed here (the regularized incomplete beta by its continued fraction, then bisection)
rather than taken from scipy, which no extra of the benchmark installs; tests/test_bench_stats.py checks it
against scipy.stats.t.
"""
from __future__ import annotations

import math
import statistics

CONFIDENCE = 0.95


def _beta_fraction(a: float, b: float, x: float) -> float:
    """The continued fraction of the regularized incomplete beta (modified Lentz; Numerical Recipes' betacf)."""
    tiny, qab, qap, qam = 1e-300, a + b, a + 1.0, a - 1.0
    c, d = 1.0, 1.0 - qab * x / qap
    d = 1.0 / (d if abs(d) > tiny else tiny)
    h = d
    for m in range(1, 300):
        m2 = 2 * m
        for num in (m * (b - m) * x / ((qam + m2) * (a + m2)), -(a + m) * (qab + m) * x / ((a + m2) * (qap + m2))):
            d = 1.0 + num * d
            d = 1.0 / (d if abs(d) > tiny else tiny)
            c = 1.0 + num / c
            c = c if abs(c) > tiny else tiny
            h *= d * c
        if abs(d * c - 1.0) < 1e-15:
            break
    return h


def incomplete_beta(a: float, b: float, x: float) -> float:
    """I_x(a, b), the regularized incomplete beta function."""
    if x <= 0.0 or x >= 1.0:
        return 0.0 if x <= 0.0 else 1.0
    front = math.exp(math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x))
    if x < (a + 1.0) / (a + b + 2.0):  # the fraction converges fast on this side; use the symmetry on the other
        return front * _beta_fraction(a, b, x) / a
    return 1.0 - front * _beta_fraction(b, a, 1.0 - x) / b


def t_cdf(t: float, df: float) -> float:
    """P(T <= t) for Student's t with df degrees of freedom."""
    tail = 0.5 * incomplete_beta(df / 2.0, 0.5, df / (df + t * t))
    return 1.0 - tail if t >= 0 else tail


def t_quantile(p: float, df: float) -> float:
    """The t with P(T <= t) = p (0 < p < 1), by bisection on the monotone CDF."""
    if not 0.0 < p < 1.0 or df <= 0:
        raise ValueError(f"t_quantile: needs 0 < p < 1 and df > 0, got p={p}, df={df}")
    if p < 0.5:
        return -t_quantile(1.0 - p, df)
    lo, hi = 0.0, 1.0
    while t_cdf(hi, df) < p:
        hi *= 2.0
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if t_cdf(mid, df) < p else (lo, mid)
        if hi - lo <= 1e-12 * hi:
            break
    return 0.5 * (lo + hi)


def ratio_interval(ratios: list[float], confidence: float = CONFIDENCE) -> dict:
    """The paired rounds' ratios -> {ratio: geometric mean, low, high: its t interval (on the logs), min, max,
    rounds}. One round gives no interval (low, high = None)."""
    if not ratios or min(ratios) <= 0:
        raise ValueError(f"ratio_interval: needs positive ratios, got {ratios}")
    logs = [math.log(r) for r in ratios]
    n, mean = len(logs), statistics.fmean(logs)
    out = {"ratio": math.exp(mean), "low": None, "high": None, "min": min(ratios), "max": max(ratios),
           "rounds": n, "per_round": list(ratios)}
    if n >= 2:
        half = t_quantile(0.5 + confidence / 2.0, n - 1) * statistics.stdev(logs) / math.sqrt(n)
        out["low"], out["high"] = math.exp(mean - half), math.exp(mean + half)
    return out


def met(interval: dict, target: float) -> bool:
    """A target is met only when the whole interval is under it (no interval, one round: never met)."""
    return interval["high"] is not None and interval["high"] < target


def verdict(interval: dict, target: float) -> str:
    return f"{'MET' if met(interval, target) else 'NOT MET'} (target < {target:g})"


def describe(interval: dict) -> str:
    """`0.912 [0.871, 0.955] (rounds 0.85-0.99, n 8)`: the point, its 95% interval and the per-round spread."""
    ci = ("no interval" if interval["high"] is None
          else f"[{interval['low']:.3f}, {interval['high']:.3f}]")
    return (f"{interval['ratio']:.3f} {ci} (rounds {interval['min']:.3f}-{interval['max']:.3f}, "
            f"n {interval['rounds']})")
