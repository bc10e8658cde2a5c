"""Per-rank memory while loading a sharded base under ZeRO-3, and across training steps (a benchmark, not a test).

    python -m bigadapt.bench.load_memory --params 1e9 --ranks 2 [--dir DIR] [--steps 6 --step-params 3e8]

1. writes a LLaMA-shaped random bf16 base as the hub does (a few safetensors shards and
   model.safetensors.index.json), one shard at a time, so the writer never holds the whole base either;
2. loads it on `--ranks` ranks through the real `deepspeed` launcher, once with transformers' from_pretrained
   (rank 0 reads every shard and broadcasts) and once with bigadapt's sharded reader (loading.load_sharded),
   and prints each rank's peak RSS while loading beside the base's size and the rank's partition;
3. with --steps: LoRA training steps on a (smaller) base on the same ranks, with and without the allocator
   setting of engine.return_freed_memory, printing each rank's RSS after every step.

Peak RSS while loading is the kernel's high-water mark (VmHWM) reset just before the load (clear_refs 5), so
imports and the process group are not counted; file pages a rank maps from the shards count, as they should.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
HIDDEN, FFN, VOCAB, HEADS, KV_HEADS = 2048, 5632, 32000, 16, 16


def llama_arch(params: float, hidden: int = HIDDEN) -> dict:
    """A LLaMA-shaped config with about `params` parameters: TinyLlama's width, the layer count to fit."""
    ffn = FFN * hidden // HIDDEN
    per_layer = 4 * hidden * hidden + 3 * hidden * ffn + 2 * hidden
    layers = max(1, round((params - 2 * VOCAB * hidden) / per_layer))
    return {"model_type": "llama", "hidden_size": hidden, "intermediate_size": ffn, "num_hidden_layers": layers,
            "num_attention_heads": HEADS, "num_key_value_heads": KV_HEADS, "vocab_size": VOCAB,
            "max_position_embeddings": 2048, "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2}


def write_base(directory: Path, arch: dict, shards: int) -> int:
    """Random bf16 weights (normal(0, 0.02), norms 1) in `shards` safetensors files with an index; returns bytes."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**arch)
    with torch.device("meta"):
        shapes = {n: tuple(t.shape) for n, t in AutoModelForCausalLM.from_config(config).state_dict().items()}
    total = sum(2 * _numel(s) for s in shapes.values())
    directory.mkdir(parents=True, exist_ok=True)
    weight_map, shard, size, index = {}, {}, 0, 0
    g = torch.Generator().manual_seed(0)
    for name, shape in shapes.items():
        t = torch.ones(shape) if len(shape) == 1 else torch.randn(shape, generator=g) * 0.02
        shard[name], size = t.to(torch.bfloat16), size + 2 * _numel(shape)
        if size >= total / shards or name == list(shapes)[-1]:
            index += 1
            _flush(directory, shard, index, weight_map, save_file)
            shard, size = {}, 0
    files = {f: f"model-{int(f.split('-')[1]):05d}-of-{index:05d}.safetensors" for f in set(weight_map.values())}
    for old, new in files.items():
        (directory / old).rename(directory / new)
    (directory / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": total}, "weight_map": {k: files[v] for k, v in weight_map.items()}}, indent=1))
    config.dtype = "bfloat16"
    config.save_pretrained(directory)
    return total


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _flush(directory: Path, shard: dict, index: int, weight_map: dict, save_file) -> None:
    name = f"shard-{index}"
    save_file(shard, str(directory / name), metadata={"format": "pt"})
    weight_map.update(dict.fromkeys(shard, name))


# ---------------------------------------------------------------- what each rank runs
def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        pass


def worker_load(directory: str, mode: str, out: str) -> None:
    import torch

    from .. import engine, zero
    from .. import model as base_model
    engine.init_distributed()
    zero.register_for_loading({"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                               "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}})
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.from_pretrained(directory)
    zero.barrier()
    before = _status("VmRSS")
    _reset_peak()
    start = time.perf_counter()
    extra = {}
    if mode.startswith("qlora"):  # model.bnb_config's recipe: nf4, compute and storage dtype bf16, double quant
        extra["quantization_config"] = base_model.bnb_config(type("M", (), {"quantization": "nf4", "dtype": "bf16"}))
    model = base_model.from_pretrained(AutoModelForCausalLM, directory, sharded=mode in ("sharded", "qlora_sharded"),
                                       config=config, dtype=torch.bfloat16, **extra)
    seconds = time.perf_counter() - start
    from ..quantized_loading import holdings
    mine = {"rank": zero.rank(), "rss_before": before, "peak": _status("VmHWM"), "rss_after": _status("VmRSS"),
            "partition_bytes": sum(zero.local_bytes(p) for p in model.parameters()), "seconds": seconds,
            **holdings(model)}
    _dump(out, zero.all_gather_object(mine))


def worker_steps(directory: str, mode: str, out: str, steps: int) -> None:
    """LoRA steps (seq 128, micro-batch 1) on the base in `directory`; RSS after each step."""
    import torch

    from .. import accounting, engine, methods, zero
    from .. import model as base_model
    from ..config import config_from_dict
    if mode == "glibc_default":
        engine.return_freed_memory = lambda: {}  # what ranks did before the allocator setting
    cfg = config_from_dict({"model": {"name_or_path": directory, "objective": "causal_lm", "dtype": "bf16"},
                            "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
                            "train": {"batch_size": 2, "micro_batch": 1, "lr": 1e-4},
                            "zero": {"stage": 3, "param_persistence_threshold": 0}})
    engine.init_distributed()
    conf = engine.ds_config(cfg, zero.world_size(), 1, accounting.shapes(cfg)[0])
    zero.register_for_loading(conf)
    model = base_model.build_base(cfg.model, 0)
    methods.apply(model, cfg)
    eng, _ = engine.initialize(model, cfg, conf)
    zero.unregister()
    x = torch.randint(3, VOCAB, (1, 128), generator=torch.Generator().manual_seed(zero.rank()))
    rss = [_status("VmRSS")]
    for _ in range(steps):
        loss = eng(input_ids=x, labels=x).loss
        eng.backward(loss)
        eng.step()
        rss.append(_status("VmRSS"))
    _dump(out, zero.all_gather_object({"rank": zero.rank(), "rss": rss, "peak": _status("VmHWM")}))


def _dump(out: str, results: list) -> None:
    import torch.distributed as dist
    if not dist.is_initialized() or dist.get_rank() == 0:
        Path(out).write_text(json.dumps(results))


# ---------------------------------------------------------------- the driver
def launch(ranks: int, *args: str) -> list[dict]:
    """`deepspeed --num_gpus ranks --module bigadapt.bench.load_memory --worker ...`: the real launcher."""
    with tempfile.NamedTemporaryFile(suffix=".json") as out:
        env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), HF_HUB_OFFLINE="1")
        deepspeed = Path(sys.executable).parent / "deepspeed"
        cmd = [str(deepspeed), "--num_gpus", str(ranks), "--master_port", str(29700 + os.getpid() % 200),
               "--module", "bigadapt.bench.load_memory", "--worker", *args, out.name]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            sys.exit(f"worker failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
        return json.loads(Path(out.name).read_text())


def report_load(directory: Path, total: int, ranks: int, modes=("transformers", "sharded")) -> dict:
    results = {}
    for mode in modes:
        results[mode] = launch(ranks, "load", str(directory), mode)
        for r in results[mode]:
            print(f"{mode:>12} rank {r['rank']}: peak RSS while loading {r['peak'] / GIB:.2f} GiB "
                  f"(before {r['rss_before'] / GIB:.2f}, after {r['rss_after'] / GIB:.2f}; peak - before "
                  f"{(r['peak'] - r['rss_before']) / GIB:.2f}) | base {total / GIB:.2f} GiB, this rank's partition "
                  f"{r['partition_bytes'] / GIB:.2f} GiB | {r['seconds']:.1f} s")
            if mode.startswith("qlora"):
                print(f"{'':>12} 4-bit codes held {r['codes_bytes'] / GIB:.3f} GiB of {r['codes_whole'] / GIB:.3f}, "
                      f"quant state {r['state_bytes'] / GIB:.3f} GiB (whole on every rank), other tensors held "
                      f"{r['other_bytes'] / GIB:.3f} GiB of {r['other_whole'] / GIB:.3f}, largest tensor "
                      f"{r['largest_bytes'] / GIB:.3f} GiB")
    return results


def report_steps(directory: Path, ranks: int, steps: int) -> dict:
    results = {}
    for mode in ("glibc_default", "return_freed"):
        results[mode] = launch(ranks, "steps", str(directory), mode, str(steps))
        for r in results[mode]:
            trail = " -> ".join(f"{v / GIB:.2f}" for v in r["rss"])
            print(f"{mode:>13} rank {r['rank']}: RSS after load, then each step (GiB): {trail}; "
                  f"peak {r['peak'] / GIB:.2f}")
    return results


def main(argv=None) -> int:
    if argv is None and "--worker" in sys.argv:  # under the launcher: [--local_rank=N] --worker kind args... out
        args = [a for a in sys.argv[1:] if not a.startswith("--local_rank")]
        kind, rest = args[1], args[2:]
        worker_load(*rest) if kind == "load" else worker_steps(rest[0], rest[1], rest[3], int(rest[2]))
        return 0
    p = argparse.ArgumentParser(prog="python -m bigadapt.bench.load_memory", description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=1e9, help="base size to write (default 1e9)")
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--shards", type=int, default=5)
    p.add_argument("--dir", type=Path, default=None, help="where the base is written (kept; default a temp dir)")
    p.add_argument("--steps", type=int, default=0, help="also run this many LoRA steps, allocator setting off/on")
    p.add_argument("--step-params", type=float, default=3e8, help="base size for the steps (default 3e8)")
    p.add_argument("--qlora", action="store_true", help="also load it 4-bit (nf4, bf16 storage) under ZeRO-3")
    p.add_argument("--qlora-only", action="store_true", help="only the two 4-bit loads (transformers', streamed)")
    p.add_argument("--json", type=Path, default=None, help="write the numbers here")
    a = p.parse_args(argv)
    root = a.dir or Path(tempfile.mkdtemp(prefix="bigadapt-load-"))
    arch = llama_arch(a.params)
    base = root / f"llama-{a.params:.0e}"
    total = write_base(base, arch, a.shards) if not (base / "config.json").is_file() else \
        json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    shards = len(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values()))
    print(f"base: {base} ({arch['num_hidden_layers']} layers, {total / 2 / 1e9:.2f}B params, "
          f"{total / GIB:.2f} GiB bf16, {shards} shards)")
    modes = ("transformers", "sharded") + (("qlora", "qlora_sharded") if a.qlora else ())
    modes = ("qlora", "qlora_sharded") if a.qlora_only else modes
    out = {"arch": arch, "base_bytes": total, "load": report_load(base, total, a.ranks, modes)}
    if a.steps:
        small = root / f"llama-{a.step_params:.0e}"
        if not (small / "config.json").is_file():
            write_base(small, llama_arch(a.step_params), a.shards)
        out["steps"] = report_steps(small, a.ranks, a.steps)
    if a.json:
        a.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
