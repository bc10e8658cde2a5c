"""`bigadapt bench peft`: bigadapt LoRA vs huggingface/peft LoRA + DeepSpeed on the same model, data and ranks.

Two modes. `same-config` (the default): every side under one DeepSpeed config (bigadapt's, or transformers'
with --peer-config), the stage as given. `auto`, the mode users meet: peft + DeepSpeed under transformers'
documented ZeRO-3 config against bigadapt with `zero.stage: auto`, both given one memory budget per rank
(--memory-budget): it reports the stage bigadapt took and why, both peaks against the budget, and whether the
loss curves agree.

Sides: bigadapt (LoRA), peft (LoRA), floor (bigadapt's engine with no adapter compute: only the adapted
projections' biases train, a reference rather than a bound) and full (full fine-tuning on bigadapt's engine,
at the stage LoRA's run takes). Each round launches every side once through the real deepspeed launcher, back
to back, alternating the order (A B C D / D C B A ...) so slow drift of the machine hits all; every ratio is
then a per-round (paired) ratio of median step times, reported with its 95% interval over the rounds
(bigadapt/bench/stats.py), for wall and for CPU time. (Running every side in one process, a step each in turn,
was tried to remove the launch-to-launch noise and dropped: DeepSpeed steps the first engine built in a process
faster than later ones, 8-15% with two identical engines.)
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import stats

# glibc's default mmap threshold grows as tensors are freed, after which freed tensors stay in the heap: peak
# RSS then tracks the allocator's history. Fixed, every tensor >= 128 KiB is mapped and unmapped with its life,
# and peak RSS tracks the tensors alive at once, as peak allocated memory does on a GPU. It slows every
# allocation (more page faults), so it is an option (`--live-memory`), not the default: step times then include
# the page faults.
LIVE_MEMORY = {"MALLOC_MMAP_THRESHOLD_": str(128 * 1024)}


def run_side(impl: str, ranks: int, extra: list[str], out: Path, env_extra: dict | None = None) -> dict:
    launcher = Path(sys.executable).parent / "deepspeed"
    # the OS's choice of port: the launcher's default (29500) collides with any other launch on the host
    cmd = [str(launcher), "--num_gpus", str(ranks), "--master_port", str(_free_port()),
           "--module", "bigadapt.bench.peft_step",
           "--impl", impl, "--out", str(out), *extra]
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               **(env_extra or {}))
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{impl} side failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return json.loads(out.read_text())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alternately(sides: tuple[str, ...], rounds: int, launch) -> dict[str, list[dict]]:
    """launch(side, out) for every side, A B B A ... so slow drift of the machine hits every side alike."""
    results: dict[str, list[dict]] = {side: [] for side in sides}
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(rounds):
            for side in sides if i % 2 == 0 else sides[::-1]:
                results[side].append(launch(side, Path(tmp) / f"{side}-{i}.json"))
    return results


def paired(results: dict[str, list[dict]], a: str, b: str, key: str = "median_step_s") -> list[float]:
    """Step time ratio a/b of each round's adjacent launches."""
    return [x[key] / y[key] for x, y in zip(results[a], results[b])]


def spread(ratios: list[float]) -> str:
    return f"{min(ratios):.3f}-{max(ratios):.3f} over {len(ratios)} rounds"


# (numerator, denominator, target, what): every ratio the bench reports, wall and CPU time, with its interval
RATIOS = (("bigadapt", "peft", 0.9, "bigadapt/peft"), ("bigadapt", "full", 0.70, "LoRA/full FT, same engine"),
          ("bigadapt", "floor", None, "bigadapt/no-adapter floor"))
# the auto mode's targets for bigadapt/peft (issue 22): the base replicated gathers nothing, partitioned still does
AUTO_TARGETS = {"replicated": 0.5, "partitioned": 0.9}
# loss curves: the first step's loss is the same forward on the same weights (equal to fp32 rounding); later
# steps may differ by reduction order only (stage 2 reduce-scatters in buckets, stage 3 per partition). fp32's
# unit roundoff is 6e-8; over the few tens of steps measured, through Adam's normalised update, that grows to
# ~1e-6 of the loss at most, and 1e-5 leaves ten times that. (A wrong gradient differs by the update's own size.)
FIRST_LOSS_RTOL, LOSS_RTOL = 1e-6, 1e-5


def compare(ranks: int = 2, rounds: int = 8, extra: list[str] = (), live_memory: bool = False,
            mode: str = "same-config", budget: int | None = None,
            sides: tuple[str, ...] = ("bigadapt", "peft", "floor")) -> dict:
    env = LIVE_MEMORY if live_memory else None
    results = alternately(sides, rounds, lambda impl, out: run_side(impl, ranks, list(extra), out, env))
    if live_memory:  # else peak RSS would silently be the allocator's history, reported as live memory
        seen = {t for rs in results.values() for r in rs for t in r["mmap_threshold"]}
        if seen != {LIVE_MEMORY["MALLOC_MMAP_THRESHOLD_"]}:
            raise SystemExit(f"--live-memory: the ranks ran with MALLOC_MMAP_THRESHOLD_ {sorted(seen)}, not "
                             f"{LIVE_MEMORY['MALLOC_MMAP_THRESHOLD_']}: the launcher did not pass it on")
    summary = {impl: side_summary(rs) for impl, rs in results.items()}
    b, p = summary["bigadapt"], summary["peft"]
    summary["ratios"] = [ratio_entry(results, num, den, target, what) for num, den, target, what in RATIOS
                         if den in results]
    summary["sides"] = list(sides)
    summary["memory_ratio"] = b["peak_rss_mb"] / p["peak_rss_mb"]
    summary["added_memory_ratio"] = b["peak_above_start_mb"] / p["peak_above_start_mb"]
    summary["curves"] = curves_agree(b["losses"], p["losses"])
    # the earlier summary's keys, which tests/distributed/test_peft_parity.py reads
    summary["max_loss_rel_diff"] = summary["curves"]["max_rel_diff"]
    summary["round_ratios"] = summary["ratios"][0]["wall"]["per_round"]
    summary["adapter_bytes_ratio"] = b["adapter_bytes"] / p["adapter_bytes"]
    summary["args"] = results["bigadapt"][0]["args"]
    summary["live_memory"], summary["mode"] = live_memory, mode
    if mode == "auto":
        summary["auto"] = auto_checks(summary, budget)
    return summary


def side_summary(rs: list[dict]) -> dict:
    """One side over its rounds: medians of the per-launch medians, the worst peak, the first launch's curve."""
    first = rs[0]
    return {"median_step_s": statistics.median(r["median_step_s"] for r in rs),
            "median_step_cpu_s": statistics.median(r["median_step_cpu_s"] for r in rs),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in rs),
            "peak_above_start_mb": max(r["peak_above_start_mb"] for r in rs),
            "first_loss": first["first_loss"], "losses": first["losses"], "trainable": first["trainable"],
            "adapter_bytes": first["adapter_bytes"], "all_gathers_per_step": first["all_gathers_per_step"],
            "stage": first["stage"], "stage_reason": first["stage_reason"],
            "predicted_bytes": first["predicted_bytes"],
            "launch_step_s": [r["median_step_s"] for r in rs],
            "launch_step_cpu_s": [r["median_step_cpu_s"] for r in rs]}


def ratio_entry(results: dict, num: str, den: str, target: float | None, what: str) -> dict:
    wall = stats.ratio_interval(paired(results, num, den))
    cpu = stats.ratio_interval(paired(results, num, den, "median_step_cpu_s"))
    entry = {"what": what, "num": num, "den": den, "target": target, "wall": wall, "cpu": cpu}
    if target is not None:
        entry["met_wall"], entry["met_cpu"] = stats.met(wall, target), stats.met(cpu, target)
    return entry


def curves_agree(a: list[list[float]], b: list[list[float]]) -> dict:
    """Two sides' loss curves (every rank, every step) from the same start: equal first losses, then within
    LOSS_RTOL; beside it, how far the curve itself moved (a difference that size would be a different run)."""
    first = max(abs(xs[0] - ys[0]) / abs(ys[0]) for xs, ys in zip(a, b))
    worst = max_rel_diff(a, b)
    moved = max(abs(y - ys[0]) / abs(ys[0]) for ys in b for y in ys)
    return {"first_rel_diff": first, "max_rel_diff": worst, "curve_moved_rel": moved,
            "first_rtol": FIRST_LOSS_RTOL, "rtol": LOSS_RTOL,
            "equal": first <= FIRST_LOSS_RTOL and worst <= LOSS_RTOL}


def max_rel_diff(a: list[list[float]], b: list[list[float]]) -> float:
    """Over every rank and step of two sides' loss curves."""
    return max(abs(x - y) / abs(y) for xs, ys in zip(a, b) for x, y in zip(xs, ys))


def auto_checks(s: dict, budget: int) -> dict:
    """The auto mode's targets: step time by the layout bigadapt took, peak memory against the budget and
    peft's, equal loss curves."""
    b, p = s["bigadapt"], s["peft"]
    kind = "partitioned" if b["stage"] == 3 else "replicated"
    target = AUTO_TARGETS[kind]
    peft_ratio = s["ratios"][0]
    budget_mb = budget / 2**20
    return {"budget_bytes": budget, "budget_mb": budget_mb, "layout": kind, "stage": b["stage"],
            "stage_reason": b["stage_reason"], "step_target": target,
            "met_wall": stats.met(peft_ratio["wall"], target), "met_cpu": stats.met(peft_ratio["cpu"], target),
            "peak_within_budget": b["peak_rss_mb"] <= budget_mb, "peft_within_budget": p["peak_rss_mb"] <= budget_mb,
            "peak_within_peft": b["peak_rss_mb"] <= p["peak_rss_mb"], "curves_equal": s["curves"]["equal"]}


def report(s: dict) -> None:
    a = s["args"]
    peer = {"same": "bigadapt's config on every side", "hf": "peft under transformers' documented ZeRO-3 config",
            "hf-all": "transformers' documented ZeRO-3 config on every side"}[a["peer_config"]]
    budget = a.get("memory_budget")
    budget = "" if not budget else f", budget {int(budget) / 2**20:,.0f} MiB per rank" if budget.isdigit() else \
        f", budget {budget} per rank"
    t = Table(title=f"LoRA step ({s['mode']}), {a['arch']} with {a.get('layers') or 6} blocks, width "
                    f"{a.get('hidden') or 384}, ZeRO stage {a['stage']}{budget}, {a['micro_batch']}x{a['seq_len']} "
                    f"tokens per rank, {len(s['bigadapt']['losses'])} ranks; {peer}")
    for col in ("", "stage", "median step (s)", "CPU per step (s)\n(all ranks)", "all-gathers per step",
                "peak memory (MiB)\n(above start)", "trainable params", "adapter file", "initial loss", "final loss"):
        t.add_column(col, justify="right")
    for impl in s["sides"]:
        r = s[impl]
        t.add_row(impl, str(r["stage"]), f"{r['median_step_s']:.4f}", f"{r['median_step_cpu_s']:.4f}",
                  f"{r['all_gathers_per_step']:.0f}", f"{r['peak_rss_mb']:.0f} ({r['peak_above_start_mb']:.0f})",
                  f"{r['trainable']:,}", f"{r['adapter_bytes']:,} B", f"{r['first_loss']:.6f}",
                  f"{r['losses'][0][-1]:.6f}")
    Console(width=max(Console().width, 120)).print(t)  # a pipe gets 80 columns: too narrow for the table
    if s["live_memory"]:
        print("--live-memory: peak RSS tracks the tensors alive at once; step times include its page faults")
    print(ratio_table(s))
    c = s["curves"]
    print(f"memory ratio bigadapt/peft = {s['memory_ratio']:.3f} (above the runtime's {s['added_memory_ratio']:.3f}); "
          f"adapter file ratio = {s['adapter_bytes_ratio']:.3f}; loss curves bigadapt vs peft: first step "
          f"{c['first_rel_diff']:.1e}, every rank and step {c['max_rel_diff']:.1e} (relative; the curve itself "
          f"moved {c['curve_moved_rel']:.1e}) -> {'EQUAL' if c['equal'] else 'NOT EQUAL'} "
          f"(tolerances {c['first_rtol']:.0e}, {c['rtol']:.0e})")
    if s["mode"] == "auto":
        print(auto_lines(s))


def ratio_table(s: dict) -> str:
    """One line per ratio and clock: point, 95% interval, per-round spread, MET / NOT MET."""
    lines = ["ratios: geometric mean of the per-round ratios [95% t interval] (per-round min-max, rounds); "
             "a target is MET only when the interval's upper end is under it"]
    for e in s["ratios"]:
        target = e["target"]
        if s["mode"] == "auto" and e["num"] == "bigadapt" and e["den"] == "peft":
            target = s["auto"]["step_target"]
        for clock in ("wall", "cpu"):
            iv = e[clock]
            tail = stats.verdict(iv, target) if target is not None else "(reference, no target)"
            lines.append(f"  {e['what']:<28} {clock:<4} {stats.describe(iv)}  {tail}")
    return "\n".join(lines)


def auto_lines(s: dict) -> str:
    x, b, p = s["auto"], s["bigadapt"], s["peft"]
    mark = {True: "MET", False: "NOT MET"}
    return "\n".join([
        f"bigadapt took stage {x['stage']} ({x['layout']}): {x['stage_reason']}",
        f"target bigadapt/peft step < {x['step_target']} ({x['layout']} base): wall {mark[x['met_wall']]}, "
        f"CPU {mark[x['met_cpu']]}",
        f"peak memory: bigadapt {b['peak_rss_mb']:.0f} MiB, peft {p['peak_rss_mb']:.0f} MiB, budget "
        f"{x['budget_mb']:.0f} MiB per rank: bigadapt <= budget {mark[x['peak_within_budget']]}, bigadapt <= peft "
        f"{mark[x['peak_within_peft']]} (peft <= budget: {x['peft_within_budget']})",
        f"loss curves equal: {mark[x['curves_equal']]}"])


def resolve_budget(text: str, args, ranks: int) -> int:
    """--memory-budget in bytes. `replicated`: the accounting's prediction for bigadapt's replicated layout
    (stage 2; the least budget under which auto keeps the base whole). `partitioned`: halfway between that and
    the partitioned layout's (stage 3, one-block windows), so auto must partition and has room to widen its
    windows. Else a size (2GiB)."""
    from .. import accounting, layout
    from ..errors import ConfigError
    from .peft_step import run_config
    if text not in ("replicated", "partitioned"):
        return layout.parse_size(text, "--memory-budget")
    cfg = run_config(argparse.Namespace(**{**vars(args), "memory_budget": None, "stage": 2}), ranks)
    shape = accounting.shapes(cfg)[0]
    lay = layout.run_layout(cfg, ranks)
    need = {st: accounting.per_rank(shape, cfg, dataclasses.replace(lay, stage=st))["total"] for st in (2, 3)}
    if text == "replicated":
        return need[2]
    if need[3] >= need[2]:
        raise ConfigError(f"--memory-budget partitioned: this base partitioned ({need[3]:,} B per rank) needs no "
                          f"less than replicated ({need[2]:,} B); give more --layers or --hidden")
    return math.ceil((need[2] + need[3]) / 2)
