"""The large-model rehearsal (issue 19): write, load, train, merge and generate a multi-billion-parameter base.

    bigadapt bench rehearsal [--params 2e9] [--out /tmp/bigadapt-rehearsal] [--ranks 2] [--steps 10] [--keep]

1. writes a LLaMA-shaped random bf16 base of `--params` parameters as hub-style safetensors shards with an
   index (load_memory.write_base: one shard in memory at a time, never the whole base);
2. `bigadapt train` on `--ranks` ranks through the real `deepspeed` launcher: LoRA r=8 on q, v under ZeRO-3,
   `train.activation_checkpointing: true`, synthetic copy task (no tokenizer), micro-batch 1 x `--seq-len`,
   `--steps` steps and a checkpoint. Each rank records its peak RSS while the base loads (the kernel's VmHWM,
   reset just before `model.build_base`, read just after) and, reset again after the load, its peak and current
   RSS after every training step (wrapping `Loop.step`; nothing in the trainer changes);
3. `bigadapt merge` (the streaming merge) and `bigadapt generate` (greedy, one process) on the run, each a child
   process whose peak RSS is its own (`os.wait4`);
4. prints every number beside the run's own prediction (estimate.json) and the model states' error
   (accounting.json), with the exact commands. It asserts nothing: it is a benchmark.

The output directory (~2 bytes per parameter for the base and as much again for the merged copy) is deleted
at the end unless --keep. Run it niced on a shared machine: `nice -n 10 bigadapt bench rehearsal`.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from .load_memory import GIB, _reset_peak, _status, llama_arch, write_base
from .peft_compare import _free_port  # the OS's choice: a port derived from the pid can collide


def run_config(base: Path, run_dir: Path, ranks: int, steps: int, seq_len: int) -> dict:
    """LoRA on q, v of the frozen bf16 base, ZeRO-3, checkpointed blocks, one sequence per rank per step."""
    return {"run_dir": str(run_dir),
            "model": {"name_or_path": str(base), "objective": "causal_lm", "dtype": "bf16"},
            "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
            "data": {"task": "synthetic_lm", "seq_len": seq_len, "num_train": 8 * ranks * steps, "num_eval": ranks},
            "train": {"batch_size": ranks, "micro_batch": 1, "lr": 1e-4, "max_steps": steps, "log_every": 1,
                      "eval_every": 0, "save_every": 0, "activation_checkpointing": True},
            "zero": {"stage": 3}}


def at_least(params: float, hidden: int) -> dict:
    """load_memory's LLaMA shape (TinyLlama's width) with enough layers for at least `params` parameters."""
    arch = llama_arch(params, hidden)
    h, f, v = hidden, arch["intermediate_size"], arch["vocab_size"]
    while (4 * h * h + 3 * h * f + 2 * h) * arch["num_hidden_layers"] + 2 * v * h + h < params:
        arch["num_hidden_layers"] += 1
    return arch


def write_byte_tokenizer(directory: Path) -> None:
    """A 259-token byte-level tokenizer (no merges) beside the weights: training on the synthetic task needs none,
    but `bigadapt merge` copies the base's tokenizer and `generate` encodes its prompt with it."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{c: 3 + i for i, c in enumerate(sorted(byte_chars))}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>",
                            eos_token="</s>").save_pretrained(directory)


# ---------------------------------------------------------------- what each rank runs
def worker(config: str, probe_dir: str) -> int:
    """`bigadapt train --config config`, with this rank's RSS recorded around the load and after every step."""
    from .. import loop, zero
    from .. import model as base_model
    from ..cli import main as cli
    mine: dict = {"steps": [], "rank": int(os.environ.get("RANK", "0"))}

    def save():  # after the load and after every step: a run stopped half way still leaves its numbers
        Path(probe_dir, f"rank{mine['rank']}.json").write_text(json.dumps(mine))
    build, step = base_model.build_base, loop.Loop.step

    def build_measured(*args, **kwargs):
        mine["rss_before_load"] = _status("VmRSS")
        _reset_peak()
        t0 = time.perf_counter()
        model = build(*args, **kwargs)
        mine.update(load_peak=_status("VmHWM"), rss_after_load=_status("VmRSS"), load_s=time.perf_counter() - t0,
                    partition_bytes=sum(zero.local_bytes(p) for p in model.parameters()))
        _reset_peak()  # from here the high-water mark is training's (DeepSpeed's initialize included)
        save()
        return model

    def step_measured(self, *args, **kwargs):
        record = step(self, *args, **kwargs)
        mine["steps"].append({"step": record["step"], "peak": _status("VmHWM"), "rss": _status("VmRSS"),
                              "step_s": record["step_s"], "loss": record["loss"]})
        save()
        return record

    base_model.build_base, loop.Loop.step = build_measured, step_measured
    return cli(["train", "--config", config])


# ---------------------------------------------------------------- the driver
def child(cmd: list[str], env: dict) -> dict:
    """Run `cmd`; its exit code, output, wall time and its own peak RSS (wait4 on its pid: not a sibling's)."""
    import tempfile
    t0 = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)  # reaped here, so its rusage is its own
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        return {"cmd": shlex.join(cmd), "rc": proc.returncode, "stdout": out.read(), "stderr": err.read(),
                "peak": usage.ru_maxrss * 1024, "seconds": time.perf_counter() - t0}


def launch_train(config: Path, probe_dir: Path, ranks: int, env: dict) -> dict:
    if ranks == 1:  # one plain process: what the smoke test runs
        cmd = [sys.executable, "-m", "bigadapt.bench.rehearsal", "--worker", str(config), str(probe_dir)]
    else:
        cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", str(ranks), "--master_port",
               str(_free_port()), "--module", "bigadapt.bench.rehearsal", "--worker", str(config),
               str(probe_dir)]
    return child(cmd, env)


def rehearse(a) -> dict:
    env = dict(os.environ, DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"), HF_HUB_OFFLINE="1")
    out = a.out
    base, run_dir, probes, merged = out / "base", out / "run", out / "probes", out / "merged"
    arch = at_least(a.params, a.hidden)
    writer = {"peak": 0, "seconds": 0.0, "cmd": "(kept from an earlier run)"}
    if not (base / "tokenizer.json").is_file():  # written last: a base cut off half way is written again
        writer = child([sys.executable, "-m", "bigadapt.bench.rehearsal", "--write", str(base), json.dumps(arch),
                        str(a.shards)], env)
        if writer["rc"]:
            sys.exit(f"writing the base failed:\n{writer['stderr'][-3000:]}")
    total = json.loads((base / "model.safetensors.index.json").read_text())["metadata"]["total_size"]
    for stale in (run_dir, probes, merged):
        shutil.rmtree(stale, ignore_errors=True)
    probes.mkdir(parents=True)
    config = out / "rehearsal.json"  # YAML is a superset of JSON: `bigadapt train --config` reads it
    config.write_text(json.dumps(run_config(base, run_dir, a.ranks, a.steps, a.seq_len), indent=1))
    res = {"arch": arch, "base_bytes": total, "params": total // 2, "write_s": writer["seconds"],
           "write_peak": writer["peak"],
           "shards": len(set(json.loads((base / "model.safetensors.index.json").read_text())["weight_map"].values())),
           "largest_shard": max(f.stat().st_size for f in base.glob("*.safetensors"))}
    res["train"] = launch_train(config, probes, a.ranks, env)
    if res["train"]["rc"]:
        return res
    res["ranks"] = sorted((json.loads(p.read_text()) for p in probes.glob("rank*.json")), key=lambda r: r["rank"])
    res["estimate"] = json.loads((run_dir / "estimate.json").read_text())["per_rank"]
    res["accounting"] = json.loads((run_dir / "accounting.json").read_text())
    bigadapt = [sys.executable, "-m", "bigadapt"]
    res["merge"] = child([*bigadapt, "merge", str(run_dir), str(merged)], env)
    res["merged_bytes"] = sum(f.stat().st_size for f in merged.glob("*.safetensors")) if merged.is_dir() else 0
    if a.new_tokens:  # 0: no generate (the smoke test: its child and peak are the merge's plumbing)
        res["generate"] = child([*bigadapt, "generate", str(run_dir), "--prompt", "bigadapt",
                                 "--max-new-tokens", str(a.new_tokens)], env)
    return res


# ---------------------------------------------------------------- the report
def _g(b) -> str:
    return f"{b / GIB:.2f}"


def report(res: dict, a) -> None:
    arch = res["arch"]
    print(f"base: {res['params'] / 1e9:.2f}B parameters ({arch['num_hidden_layers']} layers x {arch['hidden_size']}, "
          f"ffn {arch['intermediate_size']}, vocab {arch['vocab_size']}), {_g(res['base_bytes'])} GiB bf16 in "
          f"{res['shards']} shards (largest {_g(res['largest_shard'])} GiB), written in {res['write_s']:.0f} s, "
          f"writer's peak RSS {_g(res['write_peak'])} GiB")
    tr = res["train"]
    print(f"$ {tr['cmd']}\n  exit {tr['rc']}, {tr['seconds']:.0f} s")
    if tr["rc"]:
        print(tr["stdout"][-3000:], tr["stderr"][-3000:], sep="\n")
        return
    est = res["estimate"]
    print(f"prediction (estimate.json, per rank): total {_g(est['total'])} GiB = model states "
          f"{_g(est['model_states'])} + activations {_g(est['activations'])} + gather buffers "
          f"{_g(est.get('zero3_gather_buffers', 0))} + logits {_g(est.get('logits', 0))} + overhead "
          f"{_g(est['framework_overhead'])}; base partition {_g(est['base_partition'])}")
    print("| rank | partition | load: RSS before | load: peak RSS | peak − before | load s | train: peak RSS "
          "(max over steps) | RSS after step 1 → last | predicted total | peak / predicted | s/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in res["ranks"]:
        steps = r["steps"]
        peak = max(s["peak"] for s in steps)
        mean_s = sum(s["step_s"] for s in steps) / len(steps)
        print(f"| {r['rank']} | {_g(r['partition_bytes'])} | {_g(r['rss_before_load'])} | {_g(r['load_peak'])} | "
              f"{_g(r['load_peak'] - r['rss_before_load'])} | {r['load_s']:.0f} | {_g(peak)} | "
              f"{_g(steps[0]['rss'])} → {_g(steps[-1]['rss'])} | {_g(est['total'])} | "
              f"{peak / est['total']:.2f} | {mean_s:.0f} |")
    for r in res["ranks"]:
        trail = " ".join(f"{s['peak'] / GIB:.2f}" for s in r["steps"])
        print(f"rank {r['rank']} peak RSS after each step (GiB): {trail}; losses "
              + " ".join(f"{s['loss']:.3f}" for s in r["steps"]))
    print(f"model states predicted vs measured, worst rank: {res['accounting']['model_states_max_rel_error']:+.2%}")
    for what in ("merge", "generate")[:1 + ("generate" in res)]:
        c = res[what]
        extra = f" = {c['peak'] / res['base_bytes']:.2f} x the base" if what == "merge" else ""
        print(f"$ {c['cmd']}\n  exit {c['rc']}, peak RSS {_g(c['peak'])} GiB{extra}, {c['seconds']:.0f} s")
        if c["rc"]:
            print(c["stderr"][-2000:])
    if res["merged_bytes"]:
        print(f"merged output: {_g(res['merged_bytes'])} GiB of safetensors")
    if "generate" in res:
        print(f"generated: {res['generate']['stdout'].strip()!r}")


def main(argv=None) -> int:
    if argv is None and "--worker" in sys.argv:  # under the launcher: [--local_rank=N] --worker config probes
        args = [x for x in sys.argv[1:] if not x.startswith("--local_rank")]
        return worker(args[1], args[2])
    if argv is None and sys.argv[1:2] == ["--write"]:  # the writer's own process: --write dir arch-json shards
        write_base(Path(sys.argv[2]), json.loads(sys.argv[3]), int(sys.argv[4]))
        write_byte_tokenizer(Path(sys.argv[2]))
        return 0
    p = argparse.ArgumentParser(prog="bigadapt bench rehearsal", description=__doc__.splitlines()[0])
    p.add_argument("--params", type=float, default=2e9, help="base size (default 2e9)")
    p.add_argument("--out", type=Path, default=Path("/tmp/bigadapt-rehearsal"),
                   help="where the base, run and merged model go (deleted at the end unless --keep)")
    p.add_argument("--keep", action="store_true", help="keep --out (a kept base is reused by the next run)")
    p.add_argument("--ranks", type=int, default=2, help="ranks (deepspeed --num_gpus; 1: one plain process)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--seq-len", type=int, default=16, help="tokens per sequence (micro-batch 1 per rank)")
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--hidden", type=int, default=2048, help="hidden size (layers are added to reach --params)")
    p.add_argument("--new-tokens", type=int, default=4,
                   help="greedy tokens `bigadapt generate` decodes (0: no generate)")
    p.add_argument("--json", type=Path, default=None, help="also write the numbers here")
    a = p.parse_args(argv)
    a.out.mkdir(parents=True, exist_ok=True)
    print(f"$ {shlex.join(['bigadapt', 'bench', 'rehearsal', *(sys.argv[1:] if argv is None else argv)])}")
    try:
        res = rehearse(a)
        report(res, a)
        if a.json:
            a.json.write_text(json.dumps(res, indent=1))
    finally:
        if not a.keep:
            shutil.rmtree(a.out, ignore_errors=True)
    return res["train"]["rc"] or res.get("merge", {}).get("rc", 0) or res.get("generate", {}).get("rc", 0)


if __name__ == "__main__":
    sys.exit(main())
