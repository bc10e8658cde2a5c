"""`bigadapt bench throughput`: LoRA vs full fine-tuning training step time (LoRA paper §4.2, footnote 5).

One process, DeepSpeed ZeRO stage 0 through bigadapt.engine (the same engine, AdamW and training step as
`bigadapt train`), the same random-init GPT-2-shaped base, batch and data on both sides. The two engines
live side by side in one process and take steps alternately (A B B A ...), so drift hits both alike.

Why LoRA is faster: it skips the weight gradients of the frozen matrices (about 1/3 of a step's matmul
FLOPs: forward 1, input-gradient 1, weight-gradient 1) and the optimizer update of all base weights, so the
ratio tends to ~2/3 as r/d -> 0. The paper measured 32.5 vs 43.1 tokens/s on GPT-3 (ratio 0.75).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from .. import accounting, engine, methods, objectives
from ..config import config_from_dict
from ..model import build_base
from . import save_json
from .latency import arch

PHASES = ("forward", "backward", "optimizer", "step")


def build(method: dict, a: dict, args) -> tuple:
    cfg = config_from_dict({"model": {"arch": a, "objective": "causal_lm", "dtype": args.dtype}, "method": method,
                            "train": {"batch_size": args.batch, "micro_batch": args.batch, "lr": 1e-5},
                            "zero": {"stage": args.stage}})
    conf = engine.ds_config(cfg, 1, 1, accounting.shapes(cfg)[0])
    model = build_base(cfg.model, 0)
    trainable = methods.apply(model, cfg)
    n = sum(model.get_parameter(t).numel() for t in trainable)
    eng, _ = engine.initialize(model, cfg, conf)
    return eng, n


def _sync() -> float:
    if torch.cuda.is_available():
        torch.cuda.synchronize()  # GPU work is asynchronous: a phase ends when its kernels have run
    return time.perf_counter()


def step(eng, x: torch.Tensor) -> dict[str, float]:
    """One training step, timed by phase: forward (with the loss), backward, optimizer step."""
    t0 = _sync()
    loss = objectives.loss_sum(eng(input_ids=x).logits, x, "causal_lm") / x.numel()
    t1 = _sync()
    eng.backward(loss)
    t2 = _sync()
    eng.step()
    t3 = _sync()
    return {"forward": t1 - t0, "backward": t2 - t1, "optimizer": t3 - t2, "step": t3 - t0}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bigadapt bench throughput", description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    # GPT-2 medium's width on both; a CPU step of all 24 layers takes ~14 s for full FT, so 4 by default
    p.add_argument("--layers", type=int, default=24 if gpu else 4, help="GPT-2 medium has 24")
    p.add_argument("--scale", type=float, default=1.0, help="d_model = 1024 * scale")
    p.add_argument("--batch", type=int, default=8 if gpu else 4)
    p.add_argument("--seq", type=int, default=512 if gpu else 128)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--steps", type=int, default=30 if gpu else 8, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3 if gpu else 2)
    p.add_argument("--stage", type=int, default=0)
    # GPT-2's gelu_new is ~7 unfused elementwise ops (and as many in backward): the same cost on both sides,
    # it dilutes the ratio; gelu_pytorch_tanh is the same function as one fused kernel
    p.add_argument("--act", default="gelu_new", help="GPT-2 activation_function (gelu_new | gelu_pytorch_tanh)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16" if gpu else "fp32")
    p.add_argument("--threads", type=int, default=None if gpu else 1, help="torch CPU threads")
    p.add_argument("--json", metavar="PATH", help="also write the numbers to this file")
    args = p.parse_args(argv)
    engine.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)  # after init_distributed, which sets one rank's share of the cores
    a = arch(args.layers, args.scale, args.seq, args.act)
    sides = {"lora": build({"name": "lora", "r": args.r, "alpha": 2 * args.r, "targets": ["q", "v"]}, a, args),
             "full": build({"name": "full"}, a, args)}
    x = torch.randint(0, a["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    x = x.to(sides["lora"][0].device)
    times: dict[str, list[dict]] = {k: [] for k in sides}
    for t in range(args.warmup + args.steps):
        for k in ("lora", "full") if t % 2 == 0 else ("full", "lora"):
            phases = step(sides[k][0], x)
            if t >= args.warmup:
                times[k].append(phases)
    med = {k: {ph: statistics.median(s[ph] for s in v) for ph in PHASES} for k, v in times.items()}
    ratio = med["lora"]["step"] / med["full"]["step"]
    compute = (med["lora"]["forward"] + med["lora"]["backward"]) / (med["full"]["forward"] + med["full"]["backward"])
    print(f"shape: GPT-2, {a['n_layer']} layers, d={a['n_embd']}, {a['n_head']} heads, vocab {a['vocab_size']}; "
          f"{args.act}; batch {args.batch} x {args.seq} tokens, {args.dtype}, DeepSpeed stage {args.stage}, 1 process "
          f"({torch.cuda.get_device_name() if gpu else f'CPU, {torch.get_num_threads()} threads'}); "
          f"median of {args.steps} alternating steps after {args.warmup} warm-up")
    for k in ("lora", "full"):
        m = med[k]
        print(f"{k:>5s}: {1e3 * m['step']:9.1f} ms/step  {args.batch * args.seq / m['step']:9.0f} tokens/s  "
              f"(forward {1e3 * m['forward']:.1f}, backward {1e3 * m['backward']:.1f}, optimizer "
              f"{1e3 * m['optimizer']:.1f} ms)  trainable {sides[k][1]:,}")
    print(f"step time ratio lora/full = {ratio:.3f} (paper GPT-3: 32.5/43.1 = 0.754; limit ~0.67; target <= 0.70); "
          f"forward+backward only = {compute:.3f}")
    return save_json(args.json, {"arch": a, "args": vars(args), "median_s": med, "ratio": ratio,
                                 "forward_backward_ratio": compute, "trainable": {k: v[1] for k, v in sides.items()}})


if __name__ == "__main__":
    main()
