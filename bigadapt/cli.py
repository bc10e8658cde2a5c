"""`bigadapt train|export|merge`: every user error is one line on stderr and exit code 2."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import EXIT_USER_ERROR, BigadaptError, ConfigError


def _train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="run config YAML (default: the embedded tiny run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.lr=2e-4 (repeatable)")
    p.add_argument("--resume", default="none", help="none | auto (newest complete checkpoint) | a checkpoint dir")
    p.add_argument("--local_rank", "--local-rank", type=int, help=argparse.SUPPRESS)  # deepspeed launcher


def _submit_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--nodes", type=int, default=1)
    p.add_argument("--gpus-per-node", type=int, default=0, help="0 = CPU job")
    p.add_argument("--ranks-per-node", type=int, help="default: one per GPU, or 1 on CPU")
    p.add_argument("--cpus-per-node", type=int, help="default: 4 per GPU rank, 1 per CPU rank")
    p.add_argument("--time", default="01:00:00", help="[D-]HH:MM:SS")
    for opt in ("--partition", "--account", "--qos", "--constraint", "--name"):
        p.add_argument(opt)
    p.add_argument("--signal-lead", type=int, default=120, help="seconds of warning (SIGUSR1) before the limit")
    p.add_argument("--sweep", action="append", default=[], metavar="KEY=V1,V2",
                   help="one array task per combination, e.g. --sweep method.r=4,8 --sweep train.seed=0,1")
    p.add_argument("--dry-run", action="store_true", help="print the job script; submit nothing")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bigadapt", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)
    _train_args(sub.add_parser("train", help="train (use through `deepspeed launch/train.py` for several ranks)"))
    e = sub.add_parser("export", help="write a checkpoint in another format")
    e.add_argument("run", help="run directory or checkpoint directory")
    e.add_argument("out")
    e.add_argument("--format", choices=["peft"], default="peft")
    m = sub.add_parser("merge", help="write a Hugging Face model with the adapter merged into the base")
    m.add_argument("run", help="run directory or checkpoint directory")
    m.add_argument("out")
    ev = sub.add_parser("eval", help="the task's metric on a trained run; writes RUN/eval-<split>.json")
    ev.add_argument("run", help="run directory or checkpoint directory")
    ev.add_argument("--split", default="dev", help="dev (E2E: valid) | test | train")
    ev.add_argument("--limit", type=int, default=0, help="score only the first N examples (sources); 0 = all")
    ev.add_argument("--beams", type=int, default=10, help="beam size (generation tasks; Table 11: 10)")
    ev.add_argument("--length-penalty", type=float, default=None,
                    help="default: Table 11's for the task, 0.9 (E2E), 0.8 (WebNLG/DART), else 1.0")
    ev.add_argument("--no-repeat-ngram-size", type=int, default=4)
    ev.add_argument("--max-new-tokens", type=int, default=64)
    ev.add_argument("--batch-size", type=int, default=1, help="prompts per generate call")
    ev.add_argument("--merged", action="store_true",
                    help="fold the adapter into the base first (LoRA, BitFit), as deployed; "
                         "writes eval-<split>-merged.json")
    rs = sub.add_parser("results", help="a Markdown table of the eval-*.json files of runs")
    rs.add_argument("runs", nargs="+")
    from .estimate_cli import add_args as _estimate_args
    _estimate_args(sub.add_parser("estimate", help="per-rank memory and storage before a run (meta device)"))
    _submit_args(sub.add_parser("submit", help="submit a run to SLURM (job array for --sweep)"))
    st = sub.add_parser("status", help="job state and progress of a run directory")
    st.add_argument("run")
    # no abbreviations: the rest goes to the bench itself (its --r is not this parser's --ranks or --rounds)
    b = sub.add_parser("bench", help="benchmarks that print side-by-side ratios", allow_abbrev=False)
    b.add_argument("what", choices=["peft", "windows", "latency", "throughput", "study", "section7"],
                   help="peft: LoRA training step vs huggingface/peft + DeepSpeed; windows: ZeRO-3 gather windows "
                        "sized from the model vs DeepSpeed's; latency: Table 1 forward latency; "
                        "throughput: LoRA vs full FT step time; study: BitFit/adapters/LoRA/full across data "
                        "fractions and time budgets; section7: the paper's Fig. 3, Fig. 4 and Table 7 on LoRA "
                        "adapters trained on a real model (options: python -m bigadapt.bench.latency -h, ...study -h)")
    b.add_argument("--ranks", type=int, default=2)
    b.add_argument("--rounds", type=int, default=2, help="alternating launches per side")
    b.add_argument("--json", help="also write the numbers to this file")
    b.add_argument("--live-memory", action="store_true",
                   help="peft: launch with a fixed glibc mmap threshold, so peak RSS tracks the tensors alive at "
                        "once rather than the allocator's history (step times then include page faults)")
    b.epilog = "Other flags go to each side, e.g. --arch llama-small --steps 40 --stage 3."
    a = sub.add_parser("analyze", help="LoRA paper §7 analyses of trained LoRA runs")
    a.add_argument("what", choices=["subspace", "amplification"],
                   help="subspace RUN_A RUN_B: φ grids (eq. 4); amplification RUN: Table 7")
    a.add_argument("runs", nargs="+", metavar="RUN", help="run or checkpoint directories")
    a.add_argument("--png", help="subspace: write the φ heat map here")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command != "bench":
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    args.rest = extra
    try:
        return _dispatch(args)
    except BigadaptError as e:
        rank = int(os.environ.get("RANK", "0"))
        # a config error is the same on every rank: rank 0 says it once. Anything else (a data file or
        # checkpoint one node cannot see) may be this rank's alone, and a silent rank leaves only its peers'
        # "connection closed" to read: every rank says it, naming itself.
        if rank == 0 or not isinstance(e, ConfigError):
            print(f"bigadapt: error{f' (rank {rank})' if rank else ''}: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _dispatch(args) -> int:
    if args.command == "train":
        from .config import load_config
        from .train import run
        return run(load_config(args.config, args.overrides), args.resume)
    if args.command == "estimate":
        from .estimate_cli import main as estimate
        return estimate(args)
    if args.command in ("submit", "status"):
        from . import jobs
        return jobs.submit(args) if args.command == "submit" else jobs.status(args.run)
    if args.command in ("eval", "results"):
        from . import evaluate
        if args.command == "results":
            print(evaluate.results_table(args.runs))
            return 0
        settings = evaluate.GenerationSettings(args.beams, args.length_penalty, args.no_repeat_ngram_size,
                                               args.max_new_tokens, args.batch_size)
        result = evaluate.evaluate_run(args.run, args.split, args.limit, settings, args.merged)
        print(" ".join(f"{k}={v:.4g}" for k, v in result["metrics"].items()), f"(n={result['n']}, {args.split})")
        return 0
    if args.command == "bench" and args.live_memory and args.what != "peft":
        raise BigadaptError("bench --live-memory: only `bench peft` takes it; drop the flag")
    if args.command == "bench" and args.what in ("study", "section7"):
        from .bench import section7, study
        return (study if args.what == "study" else section7).main(args.rest)
    if args.command == "bench" and args.what not in ("peft", "windows"):
        from .bench import latency, throughput
        bench = latency if args.what == "latency" else throughput
        result = bench.main(args.rest)
        if args.json:
            import json
            with open(args.json, "w") as f:
                json.dump(result, f, indent=1)
        return 0
    if args.command == "analyze":
        return _analyze(args)
    if args.command == "bench":
        import json

        from .bench import peft_compare, windows
        if args.what == "peft":
            bench, summary = peft_compare, peft_compare.compare(args.ranks, args.rounds, args.rest, args.live_memory)
        else:
            bench, summary = windows, windows.compare(args.ranks, args.rounds, args.rest)
        bench.report(summary)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(summary, f, indent=1)
        return 0
    from . import export
    if args.command == "export":
        return export.to_peft(args.run, args.out)
    return export.merged(args.run, args.out)


def _analyze(args) -> int:
    from .analysis import amplification, subspace
    want = 2 if args.what == "subspace" else 1
    if len(args.runs) != want:
        raise BigadaptError(f"analyze {args.what}: expects {want} run director{'ies' if want > 1 else 'y'}, "
                            f"got {len(args.runs)}")
    return subspace.report(*args.runs, png=args.png) if want == 2 else amplification.report(args.runs[0])


def entry() -> None:
    sys.exit(main())
