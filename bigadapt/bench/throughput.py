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

from .. import engine, methods, objectives
from ..config import config_from_dict
from ..model import build_base
from .latency import arch


def build(method: dict, a: dict, args) -> tuple:
    cfg = config_from_dict({"model": {"arch": a, "objective": "causal_lm", "dtype": args.dtype}, "method": method,
                            "train": {"batch_size": args.batch, "micro_batch": args.batch, "lr": 1e-5},
                            "zero": {"stage": args.stage}})
    model = build_base(cfg.model, 0)
    trainable = methods.apply(model, cfg)
    n = sum(model.get_parameter(t).numel() for t in trainable)
    eng, _ = engine.initialize(model, cfg, engine.ds_config(cfg, 1, 1, n))
    return eng, n


def step(eng, x: torch.Tensor) -> float:
    loss = objectives.loss_sum(eng(input_ids=x).logits, x, "causal_lm") / x.numel()
    eng.backward(loss)
    eng.step()
    return loss.item()  # .item() synchronises, so the step is finished when the clock stops


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="bigadapt bench throughput", description=__doc__.splitlines()[0])
    gpu = torch.cuda.is_available()
    p.add_argument("--layers", type=int, default=24 if gpu else 4, help="GPT-2 medium has 24")
    p.add_argument("--scale", type=float, default=1.0 if gpu else 0.25, help="d_model = 1024 * scale")
    p.add_argument("--batch", type=int, default=8 if gpu else 4)
    p.add_argument("--seq", type=int, default=512 if gpu else 128)
    p.add_argument("--r", type=int, default=4)
    p.add_argument("--steps", type=int, default=30 if gpu else 12, help="timed steps per side")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stage", type=int, default=0)
    # GPT-2's gelu_new is ~7 unfused elementwise ops (and as many in backward): the same cost on both sides,
    # it dilutes the ratio; gelu_pytorch_tanh is the same function as one fused kernel
    p.add_argument("--act", default="gelu_new", help="GPT-2 activation_function (gelu_new | gelu_pytorch_tanh)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default="bf16" if gpu else "fp32")
    p.add_argument("--threads", type=int, default=None if gpu else 1, help="torch CPU threads")
    args = p.parse_args(argv)
    engine.init_distributed()
    if args.threads:
        torch.set_num_threads(args.threads)  # after init_distributed, which sets one rank's share of the cores
    a = arch(args.layers, args.scale, args.seq, args.act)
    sides = {"lora": build({"name": "lora", "r": args.r, "alpha": 2 * args.r, "targets": ["q", "v"]}, a, args),
             "full": build({"name": "full"}, a, args)}
    x = torch.randint(0, a["vocab_size"], (args.batch, args.seq), generator=torch.Generator().manual_seed(0))
    x = x.to(sides["lora"][0].device)
    times: dict[str, list[float]] = {k: [] for k in sides}
    for t in range(args.warmup + args.steps):
        for k in ("lora", "full") if t % 2 == 0 else ("full", "lora"):
            t0 = time.perf_counter()
            step(sides[k][0], x)
            if t >= args.warmup:
                times[k].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratio = med["lora"] / med["full"]
    print(f"shape: GPT-2, {a['n_layer']} layers, d={a['n_embd']}, {a['n_head']} heads, vocab {a['vocab_size']}; "
          f"{args.act}; batch {args.batch} x {args.seq} tokens, {args.dtype}, DeepSpeed stage {args.stage}, 1 process "
          f"({torch.cuda.get_device_name() if gpu else f'CPU, {torch.get_num_threads()} threads'}); "
          f"median of {args.steps} alternating steps after {args.warmup} warm-up")
    for k in ("lora", "full"):
        print(f"{k:>5s}: {1e3 * med[k]:9.1f} ms/step  {args.batch * args.seq / med[k]:9.0f} tokens/s  "
              f"trainable {sides[k][1]:,}")
    print(f"step time ratio lora/full = {ratio:.3f} (paper GPT-3: 32.5/43.1 = 0.754; limit ~0.67; target <= 0.70)")
    return {"arch": a, "args": vars(args), "median_step_s": med, "ratio": ratio,
            "trainable": {k: v[1] for k, v in sides.items()}}


if __name__ == "__main__":
    main()
