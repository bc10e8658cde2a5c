"""`bigadapt bench latency`: forward latency of base vs LoRA (merged, unmerged) vs AdapterL/AdapterH (Table 1).

One process, plain torch (no DeepSpeed: inference only), random weights. The shape is GPT-2 medium
(24 layers, d = 1024, 16 heads, vocab 50257) shrunk by `--layers`/`--scale`; the vocabulary shrinks with
d·L so the LM head keeps medium's share of the FLOPs (V/(12·d·L) ≈ 0.17). Every trial runs each variant
once, in a rotated order, so machine drift and cache effects hit all variants alike. The overhead of a
variant is the median over trials of its time / the base's time *in the same trial* (paired), with a 95%
confidence interval of that median from order statistics (no distributional assumption): "within 1% of the
base" is a claim the interval can support or refute, where a single ratio cannot.

Variants: `base` (no method), `lora_merged` (ΔW added into W; the wrapper's forward is then one branch),
`lora` (unmerged: two extra thin matmuls per adapted projection), `adapter_l`, `adapter_h` (bottleneck r).
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from pathlib import Path

import torch

from .. import methods
from ..config import config_from_dict
from ..model import build_base
from . import save_json

MEDIUM = {"n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257}
TABLE1 = [(32, 512), (16, 256), (1, 128)]
FIG5 = [(b, s) for b in (1, 2, 4, 8, 16, 32) for s in (128, 256, 512)]
VARIANTS = ("base", "lora_merged", "lora", "adapter_l", "adapter_h")


def arch(layers: int, scale: float, seq: int, act: str = "gelu_new") -> dict:
    d = int(MEDIUM["n_embd"] * scale)
    heads = max(1, int(MEDIUM["n_head"] * scale))
    vocab = max(256, round(MEDIUM["vocab_size"] * d * layers / (MEDIUM["n_embd"] * MEDIUM["n_layer"])))
    return {"model_type": "gpt2", "n_layer": layers, "n_embd": d, "n_head": heads, "vocab_size": vocab,
            "n_positions": max(1024, seq), "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
            "bos_token_id": 0, "eos_token_id": 0, "activation_function": act}


def build_variants(a: dict, lora_r: int, adapter_r: int, dtype: str) -> dict[str, torch.nn.Module]:
    """Five copies of one random base; each method's trained-looking state is random (B != 0, W_up != 0)
    so no kernel can shortcut a zero tensor."""
    model_cfg = {"arch": a, "objective": "causal_lm", "dtype": dtype}
    base = build_base(config_from_dict({"model": model_cfg}).model, 0)
    # every variant, base included, is a deep copy: the same allocation history, so no variant gets luckier
    # memory placement (the original base ran 3-7% slower than its copies here)
    out = {"base": copy.deepcopy(base)}
    for name, method in (("lora", {"name": "lora", "r": lora_r, "alpha": 2 * lora_r, "targets": ["q", "v"]}),
                         ("adapter_l", {"name": "adapter_l", "r": adapter_r}),
                         ("adapter_h", {"name": "adapter_h", "r": adapter_r})):
        m = copy.deepcopy(base)
        methods.apply(m, config_from_dict({"model": model_cfg, "method": method}))
        for p in m.parameters():
            if p.requires_grad and p.ndim == 2:
                torch.nn.init.normal_(p, std=0.02)
        out[name] = m.to(base.dtype)
    merged = copy.deepcopy(out["lora"])
    methods.get("lora").merge(merged)
    out["lora_merged"] = merged
    return {k: out[k].eval().requires_grad_(False) for k in VARIANTS}


def time_cell(models: dict, batch: int, seq: int, vocab: int, trials: int, warmup: int,
              device) -> dict[str, list[float]]:
    """Forward times (s) per variant, one per trial; trial t runs the variants rotated by t."""
    x = torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(batch * seq)).to(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {k: [] for k in models}
    names = list(models)
    with torch.inference_mode():
        for t in range(warmup + trials):
            for k in names[t % len(names):] + names[:t % len(names)]:
                sync()
                t0 = time.perf_counter()
                models[k](input_ids=x)
                sync()
                if t >= warmup:
                    times[k].append(time.perf_counter() - t0)
    return times


def median_ci(values: list[float], z: float = 1.96) -> tuple[float, float, float]:
    """(median, low, high): the sample median and the order statistics around it that cover the population
    median with ~95% probability, whatever the distribution (the count below the median is binomial(n, 1/2);
    its normal approximation picks the ranks)."""
    v, n = sorted(values), len(values)
    half = z * math.sqrt(n) / 2
    lo, hi = max(0, math.floor(n / 2 - half) - 1), min(n - 1, math.ceil(n / 2 + half))
    return statistics.median(v), v[lo], v[hi]


def paired_overhead(times: dict[str, list[float]], variant: str) -> tuple[float, float, float]:
    """% overhead vs base: median of per-trial ratios and its 95% interval."""
    ratios = [100 * (x / b - 1) for x, b in zip(times[variant], times["base"])]
    return median_ci(ratios)


def parse_cells(spec: str) -> list[tuple[int, int]]:
    if spec in ("table1", "fig5"):
        return TABLE1 if spec == "table1" else FIG5
    return [tuple(int(v) for v in c.split("x")) for c in spec.split(",")]


def grid_of(cells: list[tuple[int, int]]) -> tuple[list[int], list[int]] | None:
    """(batches, seqs) when the cells are every batch x seq pair of both lists, as Fig. 5's are; else None."""
    batches, seqs = sorted({b for b, _ in cells}), sorted({s for _, s in cells})
    return (batches, seqs) if len(set(cells)) == len(batches) * len(seqs) == len(cells) else None


def overhead_grid(result: dict) -> tuple[list[int], list[int], dict]:
    """(batches, seqs, {(batch, seq): {variant: % overhead}}) of a run whose cells form a grid."""
    batches, seqs = grid_of([(c["batch"], c["seq"]) for c in result["cells"]])
    return batches, seqs, {(c["batch"], c["seq"]): c["overhead_pct"] for c in result["cells"]}


def write_heat_maps(prefix: str, result: dict, top: float, fmt: str = "png") -> list[str]:
    """Fig. 5: one heat map per variant (matplotlib, extra [plot]), rows = batch size (smallest on top), columns =
    sequence length, each cell annotated with its % overhead; colour 0% .. `top`% (values outside are clipped)."""
    from ..analysis.heatmap import figure_path, heat_maps
    batches, seqs, over = overhead_grid(result)
    a = result.get("arch", {})
    shape = f"GPT-2, {a.get('n_layer', '?')} layers, d={a.get('n_embd', '?')}"
    paths = []
    for k in VARIANTS[1:]:
        g = torch.tensor([[over[b, s][k] for s in seqs] for b in batches])
        path = figure_path(f"{prefix}-{k}", fmt)
        heat_maps(path, {k: g}, f"Inference latency overhead of {k} vs. the base\n({shape})",
                  xlabel="sequence length", ylabel="batch size", colorbar="% overhead", vmin=0.0, vmax=top,
                  xticks=seqs, yticks=batches, annotate=True)
        paths.append(str(path))
    return paths


def print_grids(result: dict) -> None:
    batches, seqs, over = overhead_grid(result)
    for k in VARIANTS[1:]:
        print(f"\n{k}: % overhead, batch (rows) x seq (columns)")
        print(f"{'':>6s}" + "".join(f"{s:>8d}" for s in seqs))
        for b in batches:
            print(f"{b:>6d}" + "".join(f"{over[b, s][k]:+7.1f}%" for s in seqs))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bigadapt bench latency", description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--layers", type=int, default=24 if gpu else 4, help="GPT-2 medium has 24")
    p.add_argument("--scale", type=float, default=1.0 if gpu else 0.25, help="d_model = 1024 * scale")
    # 32 x 512 alone takes ~10 min on 2 shared CPU cores (5 variants x 33 forwards), so the CPU default drops it
    p.add_argument("--cells", default="table1" if gpu else "16x256,4x128,1x128",
                   help="table1 (32x512,16x256,1x128) | fig5 (batch 1..32 x seq 128..512) | BxS,BxS,...")
    p.add_argument("--trials", type=int, default=100)  # ~7.5 min for the CPU default cells on 1 thread
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--lora-r", type=int, default=4)
    p.add_argument("--adapter-r", type=int, default=None, help="bottleneck; default d_model/16 (64 at d=1024)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16" if gpu else "fp32")
    p.add_argument("--png", metavar="PREFIX", help="with a full batch x seq grid (e.g. --cells fig5): write "
                   "<PREFIX>-<variant>.png heat maps of the overhead, as the paper's Fig. 5")
    p.add_argument("--png-top", type=float, default=40.0, help="the overhead %% drawn yellow (default 40)")
    p.add_argument("--format", default="png", choices=["png", "svg", "pdf"], help="file format of the heat maps")
    p.add_argument("--from-json", metavar="PATH", help="time nothing: print and draw a run saved with --json")
    # one thread on CPU: on a shared host, OpenMP threads spinning against other jobs make timings 5-10x noisier
    p.add_argument("--threads", type=int, default=None if gpu else 1, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this file")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.from_json:
        return save_json(args.json, redraw(p, args))
    cells = parse_cells(args.cells)
    if args.png and not grid_of(cells):
        p.error(f"--png: the cells {args.cells} are not a full batch x seq grid; pass --cells fig5 or one, "
                "e.g. 1x128,1x256,4x128,4x256")
    a = arch(args.layers, args.scale, max(s for _, s in cells))
    adapter_r = args.adapter_r or max(1, a["n_embd"] // 16)
    device = torch.device("cuda" if gpu else "cpu")
    models = {k: m.to(device) for k, m in build_variants(a, args.lora_r, adapter_r, args.dtype).items()}
    print(f"shape: GPT-2, {a['n_layer']} layers, d={a['n_embd']}, {a['n_head']} heads, vocab {a['vocab_size']}, "
          f"{args.dtype} on {device} ({torch.get_num_threads()} threads); LoRA r={args.lora_r} on q,v; "
          f"adapter r={adapter_r}; median of {args.trials} trials after {args.warmup} warm-up, variants interleaved")
    print("overhead: median of per-trial time / base time, with its 95% interval")
    print(f"{'batch x seq':>12s} {'base ms':>9s} " + " ".join(f"{k:>21s}" for k in VARIANTS[1:]))
    result = {"arch": a, "args": vars(args), "cells": []}
    for batch, seq in cells:
        times = time_cell(models, batch, seq, a["vocab_size"], args.trials, args.warmup, device)
        med = {k: statistics.median(v) for k, v in times.items()}
        paired = {k: paired_overhead(times, k) for k in VARIANTS[1:]}
        over = {k: m for k, (m, _, _) in paired.items()}
        ci = {k: [lo, hi] for k, (_, lo, hi) in paired.items()}
        print(f"{f'{batch} x {seq}':>12s} {1e3 * med['base']:9.2f} "
              + " ".join(f"{m:+6.1f}% ({lo:+.1f}..{hi:+.1f})".rjust(21) for m, lo, hi in paired.values()))
        result["cells"].append({"batch": batch, "seq": seq, "median_s": med, "overhead_pct": over,
                                "overhead_ci95_pct": ci})
    show_grid(result, args.png, args.png_top, args.format)
    return save_json(args.json, result)


def show_grid(result: dict, png: str | None, top: float, fmt: str = "png") -> None:
    grid = grid_of([(c["batch"], c["seq"]) for c in result["cells"]])
    if grid and len(result["cells"]) > 1:
        print_grids(result)
    if png:
        paths = write_heat_maps(png, result, top, fmt)
        print(f"\nheat maps: {', '.join(paths)} (colour 0% .. +{top:g}% overhead)")


def redraw(p: argparse.ArgumentParser, args) -> dict:
    try:
        result = json.loads(Path(args.from_json).read_text())
        cells = [(c["batch"], c["seq"]) for c in result["cells"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        p.error(f"--from-json {args.from_json}: not a saved `bench latency --json` run ({e})")
    if args.png and not grid_of(cells):
        p.error("--png: the saved cells are not a full batch x seq grid; run with --cells fig5")
    show_grid(result, args.png, args.png_top, args.format)
    return result


if __name__ == "__main__":
    main()
