"""One side of the LoRA-vs-PEFT step-time benchmark, run on every rank by the deepspeed launcher.

Both sides share the base, DeepSpeed config (by default), optimizer, data and training step. `bigadapt` is
bigadapt's LoRA module under bigadapt's engine; `peft` is huggingface/peft's LoraModel under DeepSpeed as a
peft user drives it (`peer_engine`). A third side, `floor`, trains only the adapted projections' biases under
bigadapt's engine: the gradient reaches the same outputs through the same ZeRO-3 gathers, with no adapter
compute. It is a reference, not a bound: bigadapt's LoRA step measured faster than it in some rounds (its
all-gathers wait longer; the module trace, and so ZeRO-3's prefetch, differs). A fourth, `full`, is full
fine-tuning under bigadapt's engine at the stage bigadapt's LoRA run takes (LoRA/full on one layout). With
`--stage auto` every bigadapt-engine side chooses its ZeRO layout from `--memory-budget` (bigadapt/layout.py);
peft under `--peer-config hf` keeps transformers' ZeRO-3 config, which is a stage-3 one. Both adapters start from the
same A (drawn here, per wrapped module in model order) and B = 0, so the two loss curves must agree step by
step; at the end each side writes its adapter file as it would for a user (bigadapt: the trainable tensors in
safetensors; peft: `save_pretrained`) and the bytes are reported.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

import torch

from .. import accounting, engine, layout, methods, objectives, zero
from .. import model as base_model
from ..config import config_from_dict
from ..display import memory_mb, resident_mb
from .sides import ARCH_NAMES, SIDE_NAMES, add_side_options

ARCHS = {
    "gpt2-small": {"model_type": "gpt2", "n_layer": 6, "n_embd": 384, "n_head": 6, "vocab_size": 4096,
                   "n_positions": 256, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0},
    "llama-small": {"model_type": "llama", "num_hidden_layers": 6, "hidden_size": 384, "num_attention_heads": 6,
                    "num_key_value_heads": 6, "intermediate_size": 1024, "vocab_size": 4096,
                    "max_position_embeddings": 256},
}
# the same modules on both sides (PEFT has no per-slice LoRA on GPT-2's fused c_attn)
TARGETS = {"gpt2-small": (["attn.c_attn"], ["c_attn"]), "llama-small": (["q", "v"], ["q_proj", "v_proj"])}
SIDES = ("bigadapt", "peft", "floor", "full")
assert tuple(ARCHS) == ARCH_NAMES and SIDES == SIDE_NAMES  # the CLI lists them without importing torch
# the floor side's only trainable tensors: the adapted projection's bias, where LoRA's B adds its output (Llama's
# q_proj has none: the norm just before it)
FLOOR = {"gpt2-small": ".attn.c_attn.bias", "llama-small": ".input_layernorm.weight"}


def hf_zero3(conf: dict, hidden: int) -> dict:
    """The ZeRO-3 config a peft user is documented to write: transformers' DeepSpeed guide (ds_config_zero3.json)
    with its "auto" values filled as the HF Trainer fills them from the hidden size."""
    z = dict(conf["zero_optimization"], overlap_comm=True, contiguous_gradients=True, sub_group_size=10**9,
             reduce_bucket_size=hidden * hidden, stage3_prefetch_bucket_size=int(0.9 * hidden * hidden),
             stage3_param_persistence_threshold=10 * hidden, stage3_max_live_parameters=10**9,
             stage3_max_reuse_distance=10**9)
    return dict(conf, zero_optimization=z)


def side_config(conf: dict, impl: str, peer_config: str, hidden: int) -> dict:
    """bigadapt's config on every side ("same"); peft as its users configure DeepSpeed ("hf"); or that config
    on every side ("hf-all": every side then holds the same base gathered, so step times compare at equal
    memory)."""
    if peer_config == "hf-all" or (impl == "peft" and peer_config == "hf"):
        return hf_zero3(conf, hidden)
    return conf


def arch(args) -> dict:
    """The base: the arch's shape, `--layers` blocks and `--hidden` width (heads of 64, LLaMA's FFN 8/3 wide)."""
    a = dict(ARCHS[args.arch])
    if args.layers:
        a["n_layer" if "n_layer" in a else "num_hidden_layers"] = args.layers
    if args.hidden:
        heads = max(1, args.hidden // 64)
        if "n_embd" in a:
            a.update(n_embd=args.hidden, n_head=heads)
        else:
            a.update(hidden_size=args.hidden, num_attention_heads=heads, num_key_value_heads=heads,
                     intermediate_size=64 * -(-8 * args.hidden // 3 // 64))
    return a


def hidden(args) -> int:
    a = arch(args)
    return a.get("n_embd") or a["hidden_size"]


def budget_value(text):
    """--memory-budget as zero.memory_budget takes it: bytes (the bench passes resolved budgets so) or a size."""
    return int(text) if text is not None and str(text).isdigit() else text


def run_config(args, world: int, impl: str = "bigadapt", stage=None):
    """The run config of one side. `stage` overrides --stage (the full side runs at LoRA's chosen stage)."""
    ours = TARGETS[args.arch][0]
    windows = accounting.DS_WINDOWS if args.windows == "deepspeed" else {}  # else sized from the model
    method = {"name": "full"} if impl == "full" else {"r": args.r, "alpha": 2 * args.r, "targets": ours}
    return config_from_dict({
        "model": {"arch": arch(args), "objective": "causal_lm"},
        "method": method,
        "data": {"seq_len": args.seq_len},  # the accounting's activations (and so stage auto) read it
        "train": {"batch_size": args.micro_batch * world, "micro_batch": args.micro_batch, "lr": args.lr},
        "zero": {"stage": args.stage if stage is None else stage, "param_persistence_threshold": args.persistence,
                 "memory_budget": budget_value(args.memory_budget), **windows},
    })


def side_stage(args, world: int, impl: str):
    """The stage a side is configured with: peft under transformers' config is ZeRO-3 (that config is a ZeRO-3
    one); full fine-tuning runs at the stage LoRA's run takes, so that LoRA/full compares one layout."""
    if args.peer_config == "hf-all" or (impl == "peft" and args.peer_config == "hf"):
        return 3
    if impl == "full":
        cfg = run_config(args, world)
        return layout.choose(cfg, layout.run_layout(cfg, world)).stage
    return None


def build(args):
    impl = args.impl
    world = zero.world_size()
    theirs = TARGETS[args.arch][1]
    cfg = run_config(args, world, impl, side_stage(args, world, impl))
    # by default every side runs under the same config, sized from bigadapt's view of the (same) base
    shape = accounting.shapes(cfg)[0]  # before register_for_loading: a meta build under it would be partitioned
    choice = layout.choose(cfg, layout.run_layout(cfg, world), shape)
    conf = engine.ds_config(cfg, world, 1, shape)
    conf = side_config(conf, impl, args.peer_config, hidden(args))
    zero.register_for_loading(conf)
    model = base_model.build_base(cfg.model, 0)
    if impl in ("bigadapt", "full"):
        methods.apply(model, cfg)
    elif impl == "floor":
        # no adapter compute, the same gradient path: backward still runs through every layer and ZeRO-3
        # re-gathers the same base
        for n, q in model.named_parameters():
            q.requires_grad = n.endswith(FLOOR[args.arch])
    else:
        from peft import LoraConfig, get_peft_model
        model.requires_grad_(False)
        model = get_peft_model(model, LoraConfig(r=args.r, lora_alpha=2 * args.r, target_modules=theirs,
                                                 lora_dropout=0.0, fan_in_fan_out=args.arch.startswith("gpt2")))
    same_start(model)
    eng = peer_engine(model, cfg, conf) if impl == "peft" else engine.initialize(model, cfg, conf)[0]
    stage = conf["zero_optimization"]["stage"]
    resolved = layout.with_zero(cfg, stage=stage, **(choice.windows or {}))
    predicted = accounting.gather_buffers(shape, resolved, accounting.Layout(world=world, stage=stage))
    plan = {"stage": stage, "stage_reason": choice.reason if impl != "peft" or args.peer_config == "same"
            else "transformers' documented ZeRO-3 config", "predicted_bytes": choice.predicted.get(stage),
            "budget_bytes": choice.budget}
    return eng, predicted, plan


def peer_engine(model, cfg, conf: dict):
    """DeepSpeed as a peft user drives it: the same torch AdamW over the trainable tensors, stock ZeRO-3
    behaviour (bigadapt's engine also gathers persistent tensors in one call, zero.coalesce_persistent_gather)."""
    import deepspeed
    params = [q for q in model.parameters() if q.requires_grad]
    t = cfg.train
    opt = torch.optim.AdamW(params, lr=t.lr, betas=tuple(t.adam_betas), eps=t.adam_eps, weight_decay=t.weight_decay,
                            foreach=True)
    return deepspeed.initialize(model=model, optimizer=opt, config=conf, model_parameters=params)[0]


def same_start(model) -> None:
    """A from one seeded draw per wrapped module (model order, which both libraries keep), B = 0. Runs before
    DeepSpeed partitions the new tensors, so plain copies reach every rank alike."""
    g = torch.Generator().manual_seed(1234)
    a = [q for n, q in model.named_parameters() if "lora_A" in n]
    b = [q for n, q in model.named_parameters() if "lora_B" in n]
    with torch.no_grad():
        for q in a:
            q.copy_(torch.randn(q.shape, generator=g) / q.shape[-1] ** 0.5)
        for q in b:
            q.zero_()


def adapter_bytes(eng, impl: str, directory: str) -> int:
    """*Collective.* Bytes of the adapter file each library writes for its user (rank 0 writes)."""
    from pathlib import Path

    from safetensors.torch import save_file
    params = [q for q in eng.module.parameters() if q.requires_grad]
    with zero.gathered(params):
        if zero.rank() != 0:
            return 0
        if impl != "peft":
            path = Path(directory) / "adapter.safetensors"
            save_file({n: q.detach().float().cpu().contiguous() for n, q in eng.module.named_parameters()
                       if q.requires_grad}, str(path))
            return path.stat().st_size
        eng.module.save_pretrained(directory)
        return (Path(directory) / "adapter_model.safetensors").stat().st_size


def gather_report(gathered, predicted: int) -> dict:
    """*Local.* The most partitioned base held gathered at once in steady state, beside the whole partitioned
    base and the accounting's prediction of it (bytes)."""
    if gathered is None:
        return {}
    return {"gathered_peak_bytes": gathered.peak, "gathered_base_bytes": gathered.whole,
            "gathered_predicted_bytes": predicted}


def timed_step(eng, x: torch.Tensor) -> tuple[float, float, float]:
    """One training step: (wall s, process CPU s, loss). CPU time as well: on a shared CPU, wall time partly
    measures the neighbours."""
    t0, c0 = time.perf_counter(), time.process_time()
    loss = objectives.loss_sum(eng(input_ids=x).logits, x, "causal_lm") / x.numel()
    eng.backward(loss)
    eng.step()
    return time.perf_counter() - t0, time.process_time() - c0, loss.item()


def one_side(args, x: torch.Tensor) -> dict:
    import peft  # noqa: F401  every side loads the same libraries (peft's import alone is ~55 MiB of RSS)
    start_mb = resident_mb()  # the runtime (torch, DeepSpeed, transformers, peft, the process group): alike
    eng, predicted, plan = build(args)
    x = x.to(eng.device)
    gathered = zero.GatheredPeak(eng.module) if plan["stage"] == 3 else None
    count = zero.AllGatherCount()
    times, cpu, losses = [], [], []
    for i in range(args.warmup + args.steps):
        if i == args.warmup:
            count.calls = 0
        if gathered:  # two steady-state steps, as a training run watches them
            gathered.active = args.warmup <= i < args.warmup + 2
        wall, c, loss = timed_step(eng, x)
        times.append(wall)
        cpu.append(c)
        losses.append(loss)
    gathers_per_step = count.calls / args.steps  # before the adapter is gathered to be saved
    trainable = sum(zero.full_numel(q) for q in eng.module.parameters() if q.requires_grad)
    with tempfile.TemporaryDirectory() as tmp:
        nbytes = adapter_bytes(eng, args.impl, tmp)
    # every rank's losses: the comparison is per rank and step (each rank has its own data)
    result = {"impl": args.impl, "median_step_s": statistics.median(times[args.warmup:]),
              "median_step_cpu_s": statistics.median(cpu[args.warmup:]),
              "peak_rss_mb": memory_mb(), "start_rss_mb": start_mb, "first_loss": losses[0], "losses": losses,
              "trainable": trainable,
              "adapter_bytes": nbytes, "world_size": zero.world_size(), "args": vars(args),
              "all_gathers_per_step": gathers_per_step,
              # as this rank's allocator saw it: the bench checks the launcher passed --live-memory's setting on
              "mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
              **plan, **gather_report(gathered, predicted)}
    results = zero.all_gather_object(result)
    result["peak_rss_mb"] = max(r["peak_rss_mb"] for r in results)  # the worst rank decides what fits
    # what the model, adapter, engine and steps added to the runtime
    result["peak_above_start_mb"] = max(r["peak_rss_mb"] - r["start_rss_mb"] for r in results)
    result["median_step_s"] = max(r["median_step_s"] for r in results)
    # CPU time summed over the ranks: the work the step costs the machine, whichever rank waits for which (a
    # rank blocked in a collective uses none; one max would credit a side for moving work between its ranks)
    result["median_step_cpu_s"] = sum(r["median_step_cpu_s"] for r in results)
    result["rank_step_cpu_s"] = [r["median_step_cpu_s"] for r in results]
    if gathered:
        result["gathered_peak_bytes"] = max(r["gathered_peak_bytes"] for r in results)
    result["losses"] = [r["losses"] for r in results]
    result["mmap_threshold"] = sorted({str(r["mmap_threshold"]) for r in results})
    return result


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m bigadapt.bench.peft_step")
    p.add_argument("--impl", choices=SIDES, required=True)
    add_side_options(p)
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int)
    args = p.parse_args()
    engine.init_distributed()
    g = torch.Generator().manual_seed(1 + zero.rank())
    x = torch.randint(1, 4096, (args.micro_batch, args.seq_len), generator=g)
    result = one_side(args, x)
    if zero.rank() == 0:
        with open(args.out, "w") as f:
            json.dump(result, f)


if __name__ == "__main__":
    main()
