"""The options of one side of `bench peft` / `bench windows` (bigadapt.bench.peft_step): one list, shared by the
side's own parser and by `bigadapt bench peft|windows --help`, which passes them on. No torch import here, so
`bigadapt --help` stays fast."""
from __future__ import annotations

import argparse

ARCH_NAMES = ("gpt2-small", "llama-small")  # bigadapt.bench.peft_step.ARCHS
SIDE_NAMES = ("bigadapt", "peft", "floor", "full")  # bigadapt.bench.peft_step.SIDES


def add_side_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("each side's run (passed to every launch)")
    g.add_argument("--arch", choices=ARCH_NAMES, default="gpt2-small", help="the random-init base")
    g.add_argument("--steps", type=int, default=20, help="timed steps per launch")
    g.add_argument("--warmup", type=int, default=5, help="untimed steps first")
    g.add_argument("--micro-batch", type=int, default=4, help="sequences per rank per step")
    g.add_argument("--seq-len", type=int, default=64, help="tokens per sequence")
    g.add_argument("--r", type=int, default=8, help="LoRA rank")
    g.add_argument("--lr", type=float, default=1e-4, help="learning rate")
    g.add_argument("--stage", type=stage, default=3, help="ZeRO stage: 0-3, or auto (bigadapt's layout from "
                   "--memory-budget; peft under --peer-config hf stays at transformers' ZeRO-3)")
    g.add_argument("--memory-budget", help="zero.memory_budget per rank: a size (2GiB) or bytes; with --stage auto")
    g.add_argument("--persistence", type=int, default=100_000, help="stage3_param_persistence_threshold")
    g.add_argument("--layers", type=int, help="blocks (default: the arch's 6)")
    g.add_argument("--hidden", type=int, help="width (default: the arch's 384; heads of 64)")
    g.add_argument("--windows", choices=["sized", "deepspeed"], default="sized",
                   help="ZeRO-3 gather windows: sized from the model (bigadapt's default) or DeepSpeed's own")
    g.add_argument("--peer-config", choices=["same", "hf", "hf-all"], default="same",
                   help="peft's DeepSpeed config: bigadapt's (the same windows and thresholds on every side), "
                        "the one transformers' DeepSpeed guide gives its users (hf), or that one on every side "
                        "(hf-all)")


SIDE_KEYS = ("arch", "steps", "warmup", "micro_batch", "seq_len", "r", "lr", "stage", "memory_budget",
             "persistence", "layers", "hidden", "windows", "peer_config")


def stage(text: str):
    """--stage: a ZeRO stage number or `auto`."""
    if text == "auto":
        return text
    if text in ("0", "1", "2", "3"):
        return int(text)
    raise argparse.ArgumentTypeError(f"{text!r}: a ZeRO stage 0-3 or auto")


def side_argv(args: argparse.Namespace, skip: tuple[str, ...] = ()) -> list[str]:
    """The side options as parsed, back to argv for the launched side (None = not given)."""
    out: list[str] = []
    for key in SIDE_KEYS:
        value = getattr(args, key)
        if value is not None and key not in skip:
            out += [f"--{key.replace('_', '-')}", str(value)]
    return out
