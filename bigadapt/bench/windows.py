"""`bigadapt bench windows`: ZeRO-3's gather windows sized from the model (bigadapt's default) vs DeepSpeed's own.

DeepSpeed's windows (prefetch 5e7, max live 1e9, reuse distance 1e9 elements) are absolute: below ~1e9
elements they keep every layer gathered from its forward to its backward, i.e. the whole base on every rank.
Both sides run bigadapt's LoRA step (`peft_step --impl bigadapt`) on the same model, data and ranks, launched
alternately (A B B A ...); each reports its median step time and the most partitioned base it held gathered at
once in steady state, beside the accounting's prediction. The windows change what is held, not the numbers
computed: the loss curves must be identical.
"""
from __future__ import annotations

import statistics

from rich.console import Console
from rich.table import Table

from .peft_compare import alternately, paired, run_side, spread

SIDES = ("sized", "deepspeed")


def compare(ranks: int = 2, rounds: int = 2, extra: list[str] = ()) -> dict:
    results = alternately(SIDES, rounds, lambda w, out: run_side("bigadapt", ranks, [*extra, "--windows", w], out))
    summary = {w: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                   "median_step_cpu_s": statistics.median(r["median_step_cpu_s"] for r in rs),
                   "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                   "gathered_peak_bytes": max(r["gathered_peak_bytes"] for r in rs),
                   "gathered_base_bytes": rs[0]["gathered_base_bytes"],
                   "gathered_predicted_bytes": rs[0]["gathered_predicted_bytes"],
                   "losses": rs[0]["losses"]} for w, rs in results.items()}
    s, d = summary["sized"], summary["deepspeed"]
    summary["step_time_ratio"] = s["median_step_s"] / d["median_step_s"]
    summary["round_ratios"] = paired(results, "sized", "deepspeed")
    summary["step_cpu_ratio"] = s["median_step_cpu_s"] / d["median_step_cpu_s"]
    summary["gathered_ratio"] = s["gathered_peak_bytes"] / d["gathered_peak_bytes"]
    summary["same_losses"] = s["losses"] == d["losses"]
    summary["args"] = results["sized"][0]["args"]
    return summary


def report(s: dict) -> None:
    a = s["args"]
    t = Table(title=f"ZeRO-3 gather windows, {a['arch']} with {a['layers'] or 6} blocks, LoRA r {a['r']}, "
                    f"{a['micro_batch']}x{a['seq_len']} tokens per rank")
    for col in ("windows", "median step (s)", "CPU per step (s)", "peak RSS (MiB)", "gathered peak (MiB)",
                "of the base", "predicted (MiB)"):
        t.add_column(col, justify="right")
    for w in SIDES:
        r = s[w]
        held = r["gathered_peak_bytes"]
        t.add_row(w, f"{r['median_step_s']:.4f}", f"{r['median_step_cpu_s']:.4f}", f"{r['peak_rss_mb']:.0f}",
                  f"{held / 2**20:.2f}", f"{held / r['gathered_base_bytes']:.0%}",
                  f"{r['gathered_predicted_bytes'] / 2**20:.2f}")
    Console(width=max(Console().width, 120)).print(t)  # a pipe gets 80 columns: too narrow for the table
    print(f"step time ratio sized/deepspeed = {s['step_time_ratio']:.3f} "
          f"(per round {spread(s['round_ratios'])}; CPU time {s['step_cpu_ratio']:.3f}); "
          f"gathered base ratio = {s['gathered_ratio']:.3f}; loss curves "
          f"{'identical' if s['same_losses'] else 'DIFFER'} on every rank and step")
