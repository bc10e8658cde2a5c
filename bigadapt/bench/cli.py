"""`bigadapt bench BENCH ...`: each benchmark is a subcommand with its own `--help`.

latency, throughput, study and section7 own their parsers (`bigadapt bench latency --help` is that parser's
help); peft and windows launch one process group per side, so their options are this process's (ranks,
rounds) plus each side's (bigadapt.bench.sides), passed on to every launch.
"""
from __future__ import annotations

from . import save_json
from .sides import SIDE_NAMES as SIDES
from .sides import add_side_options, side_argv

# name -> one-line purpose; these parse their own arguments
DELEGATED = {
    "latency": "Table 1 / Fig. 5: forward latency of LoRA (merged, unmerged) and adapters against the base",
    "throughput": "LoRA vs full fine-tuning training-step time (the paper's 25%% speed-up claim)",
    "study": "BitFit / adapters / LoRA / full across data fractions and time budgets, with a plot",
    "section7": "the paper's §7 (Fig. 3, Fig. 4, Table 7) on LoRA adapters trained on a real model",
    "rehearsal": "a >= 2B LLaMA-shaped base written, trained (LoRA, ZeRO-3, 2 ranks), merged and generated",
}
LAUNCHED = {
    "peft": "LoRA training step and memory vs huggingface/peft + DeepSpeed, alternated launches",
    "windows": "ZeRO-3 gather windows sized from the model vs DeepSpeed's own",
}


def add_parser(sub) -> None:
    b = sub.add_parser("bench", help="benchmarks that print side-by-side ratios (no test asserts a time)",
                       description="Benchmarks that print ratios measured side by side in one run.")
    benches = b.add_subparsers(dest="what", required=True, metavar="BENCH")
    for name, purpose in DELEGATED.items():
        # add_help=False: --help reaches the bench's own parser, which lists its options
        benches.add_parser(name, help=purpose, add_help=False)
    for name, purpose in LAUNCHED.items():
        p = benches.add_parser(name, help=purpose, description=purpose)
        p.add_argument("--ranks", type=int, default=2, help="ranks per launch (deepspeed --num_gpus)")
        if name == "peft":
            p.add_argument("--rounds", type=int, default=8,
                           help="rounds, each launching every side once, order alternated (A B C D / D C B A ...); "
                                "every ratio gets a 95%% interval over them (at least 8 for a result)")
            p.add_argument("--json", "--json-out", dest="json", help="also write the numbers to this file")
            p.add_argument("--mode", choices=["same-config", "auto"], default="same-config",
                           help="same-config: every side under one DeepSpeed config at --stage; auto: peft under "
                                "transformers' ZeRO-3 config vs bigadapt with zero.stage auto, one --memory-budget")
            p.add_argument("--sides", default=",".join(SIDES), type=_sides,
                           help="the sides launched each round: bigadapt and peft, and floor (no adapter compute) "
                                "and full (full fine-tuning), whose ratios to bigadapt are then reported too")
            p.add_argument("--live-memory", action="store_true",
                           help="launch with a fixed glibc mmap threshold, so peak RSS tracks the tensors alive "
                                "at once rather than the allocator's history (step times then include page faults)")
        else:
            p.add_argument("--rounds", type=int, default=2, help="alternating launches per side (A B B A ...)")
            p.add_argument("--json", help="also write the numbers to this file")
        add_side_options(p)


def main(args) -> int:
    if args.what in DELEGATED:
        return _delegated(args.what, args.rest)
    from . import peft_compare, windows
    if args.what == "peft":
        bench, summary = peft_compare, _peft(args)
    else:  # the windows bench sets --windows on each side itself
        bench, summary = windows, windows.compare(args.ranks, args.rounds, side_argv(args, skip=("windows",)))
    bench.report(summary)
    save_json(args.json, summary)
    return 0


def _delegated(what: str, argv: list[str]) -> int:
    if what == "rehearsal":
        from . import rehearsal
        return rehearsal.main(argv)
    if what in ("study", "section7"):
        from . import section7, study
        return (study if what == "study" else section7).main(argv)
    from . import latency, throughput
    (latency if what == "latency" else throughput).main(argv)
    return 0


def _peft(args) -> dict:
    """The peft bench; --mode auto sets every side's stage to auto (peft stays at transformers' ZeRO-3) under
    one memory budget, resolved to bytes here so every launch gets the same number."""
    from ..errors import ConfigError
    from . import peft_compare
    budget = None
    if args.mode == "auto":
        if not args.memory_budget:
            raise ConfigError("bench peft --mode auto: give --memory-budget (a size per rank such as 2GiB, or "
                              "replicated / partitioned: the accounting's budget for that layout)")
        if args.peer_config == "hf-all":
            raise ConfigError("bench peft --mode auto: --peer-config hf-all would put bigadapt at ZeRO-3 as well; "
                              "leave it out (auto runs peft under transformers' config, bigadapt under stage auto)")
        args.peer_config = "hf"  # the config peft users are documented to write
        budget = peft_compare.resolve_budget(args.memory_budget, args, args.ranks)
        args.stage, args.memory_budget = "auto", str(budget)
    return peft_compare.compare(args.ranks, args.rounds, side_argv(args), args.live_memory, args.mode, budget,
                                args.sides)


def _sides(text: str) -> tuple[str, ...]:
    """--sides: a comma list with bigadapt and peft in it (every target compares those two)."""
    import argparse
    wanted = {w.strip() for w in text.split(",") if w.strip()}
    if wanted - set(SIDES) or not {"bigadapt", "peft"} <= wanted:
        raise argparse.ArgumentTypeError(f"{text!r}: a comma list of {', '.join(SIDES)} with bigadapt and peft")
    return tuple(side for side in SIDES if side in wanted)
