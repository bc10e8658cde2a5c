"""`bigadapt bench section7`: the LoRA paper's §7 analyses on adapters trained on a real pretrained model.

§7 asks what ΔW looks like: whether the top directions of adapters of different rank agree (Fig. 3,
r = 8 vs r = 64), whether two seeds at r = 64 learn the same directions (Fig. 4), and how ΔW relates to W
(Table 7 at r = 4 and r = 64; App. H.3). This trains exactly those four adapters — LoRA on W_q and W_v, one
task, the paper's convention of one α for every r — and reports the four analyses, each beside its control:
the same numbers for the untrained adapters (A at its init, read back from the seed), so a reader sees
what training put into A rather than what its random init already had.

    python -m bigadapt.bench.section7 run --model DIR --glue ../shared/data/glue --out runs/section7
    python -m bigadapt.bench.section7 report runs/section7 --png docs/section7
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .study import run_configs, run_parser

# name -> (r, seed): Fig. 3 compares r8 with r64, Fig. 4 r64 with r64-seed1, Table 7 r4 and r64
RUNS = {"r4": (4, 0), "r8": (8, 0), "r64": (64, 0), "r64-seed1": (64, 1)}
TASKS = {"sst2": ("glue/sst2", 2), "mrpc": ("glue/mrpc", 2), "cola": ("glue/cola", 2), "rte": ("glue/rte", 2)}


def run_config(args, name: str) -> dict:
    r, seed = RUNS[name]
    return {
        "run_dir": str(Path(args.out) / f"{args.task}-lora-{name}"),
        "model": {"name_or_path": args.model, "objective": "seq_cls", "num_labels": TASKS[args.task][1]},
        "method": {"name": "lora", "r": r, "alpha": args.alpha, "targets": ["q", "v"]},
        "data": {"task": TASKS[args.task][0], "path": args.glue, "seq_len": args.seq_len},
        "train": {"batch_size": 32, "micro_batch": 32, "lr": args.lr, "warmup_steps": args.steps // 16,
                  "max_steps": args.steps, "eval_every": args.steps // 2, "log_every": 50, "seed": seed,
                  "keep_last": 1},
        "zero": {"stage": 0},
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bigadapt bench section7", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = run_parser(sub, "train the missing adapters (one process each, ZeRO stage 0, all cores)",
                   "the GLUE task folders (SST-2/, ...)", "runs/section7")
    r.add_argument("--task", choices=list(TASKS), default="sst2")
    r.add_argument("--steps", type=int, default=1000)
    r.add_argument("--lr", type=float, default=1e-3)
    r.add_argument("--alpha", type=float, default=16.0, help="one α for every r (the paper's convention)")
    r.add_argument("--seq-len", type=int, default=64)
    r.add_argument("--runs", type=lambda s: s.split(","), default=list(RUNS), help=f"of {','.join(RUNS)}")
    rep = sub.add_parser("report", help="Fig. 3, Fig. 4, Table 7 and App. H.3 of the complete runs")
    rep.add_argument("out")
    rep.add_argument("--png", help="write <PNG>-fig3.png and <PNG>-fig4.png heat maps (basis A)")
    rep.add_argument("--format", default="png", choices=["png", "svg", "pdf"], help="file format of the heat maps")
    args = p.parse_args(argv)
    if args.what == "run":
        bad = [n for n in args.runs if n not in RUNS]
        if bad:
            p.error(f"--runs: unknown {bad}; use some of {','.join(RUNS)}")
        return run_configs(Path(args.out), [run_config(args, n) for n in args.runs])
    from .section7_report import report
    return report(Path(args.out), args.png, args.format)


if __name__ == "__main__":
    sys.exit(main())
