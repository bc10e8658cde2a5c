"""`bigadapt bench peft`: bigadapt LoRA vs huggingface/peft LoRA + DeepSpeed on the same model, data and ranks.

Launches the sides alternately (A B C C B A ...) through the real deepspeed launcher so slow drift of the
machine hits all, then prints each side's median step time, all-gather calls per step, peak memory and the
ratios. The third side, `floor`, is bigadapt's engine with no adapter compute: how far below peft any LoRA
layer on that engine could go.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

SIDES = ("bigadapt", "peft", "floor")  # floor: the same step with no adapter compute (see peft_step)


def run_side(impl: str, ranks: int, extra: list[str], out: Path) -> dict:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(ranks), "--module", "bigadapt.bench.peft_step",
           "--impl", impl, "--out", str(out), *extra]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def alternately(sides: tuple[str, ...], rounds: int, launch) -> dict[str, list[dict]]:
    """launch(side, out) for every side, A B B A ... so slow drift of the machine hits every side alike."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for side in sides if i % 2 == 0 else sides[::-1]:
                results[side].append(launch(side, Path(tmp) / f"{side}-{i}.json"))
    return results


def compare(ranks: int = 2, rounds: int = 2, extra: list[str] = ()) -> dict:
    results = alternately(SIDES, rounds, lambda impl, out: run_side(impl, ranks, list(extra), out))
    summary = {impl: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                      "median_step_cpu_s": statistics.median(r["median_step_cpu_s"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs), "first_loss": rs[0]["first_loss"],
                      "losses": rs[0]["losses"], "trainable": rs[0]["trainable"],
                      "adapter_bytes": rs[0]["adapter_bytes"],
                      "all_gathers_per_step": rs[0]["all_gathers_per_step"]} for impl, rs in results.items()}
    b, p, f = summary["bigadapt"], summary["peft"], summary["floor"]
    summary["step_time_ratio"] = b["median_step_s"] / p["median_step_s"]
    # the best any LoRA implementation could reach against peft with this engine: zero adapter cost
    summary["floor_over_peft"] = f["median_step_s"] / p["median_step_s"]
    summary["bigadapt_over_floor"] = b["median_step_s"] / f["median_step_s"]
    summary["step_cpu_ratio"] = b["median_step_cpu_s"] / p["median_step_cpu_s"]
    summary["memory_ratio"] = b["peak_rss_mb"] / p["peak_rss_mb"]
    summary["same_initial_loss"] = abs(b["first_loss"] - p["first_loss"]) < 1e-5
    # the same start and data: the loss curves of every rank must agree (fp32; summation order may differ)
    pairs = [(x, y) for bl, pl in zip(b["losses"], p["losses"]) for x, y in zip(bl, pl)]
    summary["max_loss_rel_diff"] = max(abs(x - y) / abs(y) for x, y in pairs)
    summary["adapter_bytes_ratio"] = b["adapter_bytes"] / p["adapter_bytes"]
    summary["args"] = results["bigadapt"][0]["args"]
    return summary


def report(s: dict) -> None:
    peer = {"same": "bigadapt's config on every side", "hf": "peft under transformers' documented ZeRO-3 config"}
    t = Table(title=f"LoRA step, {s['args']['arch']} with {s['args'].get('layers') or 6} blocks, "
                    f"ZeRO stage {s['args']['stage']}, "
                    f"{s['args']['micro_batch']}x{s['args']['seq_len']} tokens per rank; "
                    f"{peer[s['args']['peer_config']]}")
    for col in ("", "median step (s)", "CPU per step (s)", "all-gathers per step", "peak memory (MiB)",
                "trainable params", "adapter file", "initial loss", "final loss"):
        t.add_column(col, justify="right")
    for impl in SIDES:
        r = s[impl]
        t.add_row(impl, f"{r['median_step_s']:.4f}", f"{r['median_step_cpu_s']:.4f}",
                  f"{r['all_gathers_per_step']:.0f}", f"{r['peak_rss_mb']:.0f}",
                  f"{r['trainable']:,}", f"{r['adapter_bytes']:,} B", f"{r['first_loss']:.6f}",
                  f"{r['losses'][0][-1]:.6f}")
    Console(width=max(Console().width, 120)).print(t)  # a pipe gets 80 columns: too narrow for the table
    print(f"step time ratio bigadapt/peft = {s['step_time_ratio']:.3f} (target <= 0.90), "
          f"CPU time ratio = {s['step_cpu_ratio']:.3f}; "
          f"memory ratio = {s['memory_ratio']:.3f} (target <= 1.0); adapter file ratio = "
          f"{s['adapter_bytes_ratio']:.3f}; loss curves from the same start agree to "
          f"{s['max_loss_rel_diff']:.1e} (max relative difference over every rank and step)")
    print(f"floor (bigadapt's engine, no adapter compute): floor/peft = {s['floor_over_peft']:.3f} "
          f"(the lowest step time ratio a LoRA on this engine could reach), "
          f"bigadapt/floor = {s['bigadapt_over_floor']:.3f}")
