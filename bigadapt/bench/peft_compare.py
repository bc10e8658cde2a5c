"""`bigadapt bench peft`: bigadapt LoRA vs huggingface/peft LoRA + DeepSpeed on the same model, data and ranks.

Launches the sides alternately (A B C C B A ...) through the real deepspeed launcher so slow drift of the
machine hits all, then prints each side's median step time, all-gather calls per step, peak memory and the
ratios. The third side, `floor`, is bigadapt's engine with no adapter compute (only the adapted projections'
biases train), a reference rather than a bound. Each round's launches run back to back, so the per-round
ratios show how far the machine moved the result. (Running every side in one process, a step each in turn,
was tried to remove the launch-to-launch noise and dropped: DeepSpeed steps the first engine built in a process
faster than later ones, 8-15% with two identical engines.)
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

from .peft_step import SIDES  # bigadapt, peft, floor: the same step with no adapter compute

# glibc's default mmap threshold grows as tensors are freed, after which freed tensors stay in the heap: peak
# RSS then tracks the allocator's history. Fixed, every tensor >= 128 KiB is mapped and unmapped with its life,
# and peak RSS tracks the tensors alive at once, as peak allocated memory does on a GPU. It slows every
# allocation (more page faults), so it is an option (`--live-memory`), not the default: step times then include
# the page faults.
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_side(impl: str, ranks: int, extra: list[str], out: Path, env_extra: dict | None = None) -> dict:
    launcher = Path(sys.executable).parent / "deepspeed"
    cmd = [str(launcher), "--num_gpus", str(ranks), "--module", "bigadapt.bench.peft_step",
           "--impl", impl, "--out", str(out), *extra]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               **(env_extra or {}))
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


def paired(results: dict[str, list[dict]], a: str, b: str) -> list[float]:
    """Step time ratio a/b of each round's adjacent launches."""
    return [x["median_step_s"] / y["median_step_s"] for x, y in zip(results[a], results[b])]


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds"


def compare(ranks: int = 2, rounds: int = 2, extra: list[str] = (), live_memory: bool = False) -> dict:
    env = LIVE_MEMORY if live_memory else None
    results = alternately(SIDES, rounds, lambda impl, out: run_side(impl, ranks, list(extra), out, env))
    if live_memory:  # else peak RSS would silently be the allocator's history, reported as live memory
        seen = {t for rs in results.values() for r in rs for t in r["mmap_threshold"]}
        if seen != {LIVE_MEMORY["MALLOC_MMAP_THRESHOLD_"]}:
            raise SystemExit(f"--live-memory: the ranks ran with MALLOC_MMAP_THRESHOLD_ {sorted(seen)}, not "
                             f"{LIVE_MEMORY['MALLOC_MMAP_THRESHOLD_']}: the launcher did not pass it on")
    summary = {impl: {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
                      "median_step_cpu_s": statistics.median(r["median_step_cpu_s"] for r in rs),
                      "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
                      "peak_above_start_mb": max(r["peak_above_start_mb"] for r in rs),
                      "first_loss": rs[0]["first_loss"],
                      "losses": rs[0]["losses"], "trainable": rs[0]["trainable"],
                      "adapter_bytes": rs[0]["adapter_bytes"],
                      "all_gathers_per_step": rs[0]["all_gathers_per_step"],
                      "launch_step_s": [r["median_step_s"] for r in rs]} for impl, rs in results.items()}
    b, p, f = summary["bigadapt"], summary["peft"], summary["floor"]
    summary["step_time_ratio"] = b["median_step_s"] / p["median_step_s"]
    # each round's launches ran back to back: their ratio is the one least moved by the machine's drift
    summary["round_ratios"] = paired(results, "bigadapt", "peft")
    summary["floor_over_peft"] = f["median_step_s"] / p["median_step_s"]
    summary["bigadapt_over_floor"] = b["median_step_s"] / f["median_step_s"]
    summary["step_cpu_ratio"] = b["median_step_cpu_s"] / p["median_step_cpu_s"]
    summary["memory_ratio"] = b["peak_rss_mb"] / p["peak_rss_mb"]
    summary["added_memory_ratio"] = b["peak_above_start_mb"] / p["peak_above_start_mb"]
    summary["same_initial_loss"] = abs(b["first_loss"] - p["first_loss"]) < 1e-5
    # the same start and data: the loss curves of every rank must agree (fp32; summation order may differ)
    summary["max_loss_rel_diff"] = max_rel_diff(b["losses"], p["losses"])
    summary["adapter_bytes_ratio"] = b["adapter_bytes"] / p["adapter_bytes"]
    summary["args"] = results["bigadapt"][0]["args"]
    summary["live_memory"] = live_memory
    return summary


def max_rel_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """Over every rank and step of two sides' loss curves."""
    return max(abs(x - y) / abs(y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def report(s: dict) -> None:
    peer = {"same": "bigadapt's config on every side", "hf": "peft under transformers' documented ZeRO-3 config",
            "hf-all": "transformers' documented ZeRO-3 config on every side"}
    t = Table(title=f"LoRA step, {s['args']['arch']} with {s['args'].get('layers') or 6} blocks, "
                    f"ZeRO stage {s['args']['stage']}, "
                    f"{s['args']['micro_batch']}x{s['args']['seq_len']} tokens per rank; "
                    f"{peer[s['args']['peer_config']]}")
    for col in ("", "median step (s)", "CPU per step (s)", "all-gathers per step",
                "peak memory (MiB)\n(above start)", "trainable params", "adapter file", "initial loss", "final loss"):
        t.add_column(col, justify="right")
    for impl in SIDES:
        r = s[impl]
        t.add_row(impl, f"{r['median_step_s']:.4f}", f"{r['median_step_cpu_s']:.4f}",
                  f"{r['all_gathers_per_step']:.0f}",
                  f"{r['peak_rss_mb']:.0f} ({r['peak_above_start_mb']:.0f})",
                  f"{r['trainable']:,}", f"{r['adapter_bytes']:,} B", f"{r['first_loss']:.6f}",
                  f"{r['losses'][0][-1]:.6f}")
    Console(width=max(Console().width, 120)).print(t)  # a pipe gets 80 columns: too narrow for the table
    if s["live_memory"]:
        print("--live-memory: peak RSS tracks the tensors alive at once; step times include its page faults")
    print(f"step time ratio bigadapt/peft = {s['step_time_ratio']:.3f} (target <= 0.90; per round "
          f"{spread(s['round_ratios'])}), CPU time ratio = {s['step_cpu_ratio']:.3f}; "
          f"memory ratio = {s['memory_ratio']:.3f} (target <= 1.0; above the runtime's "
          f"{s['added_memory_ratio']:.3f}); adapter file ratio = "
          f"{s['adapter_bytes_ratio']:.3f}; loss curves from the same start agree to "
          f"{s['max_loss_rel_diff']:.1e} (max relative difference over every rank and step)")
    print(f"floor (bigadapt's engine, no adapter compute): floor/peft = {s['floor_over_peft']:.3f}, "
          f"bigadapt/floor = {s['bigadapt_over_floor']:.3f}")
