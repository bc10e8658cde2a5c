"""`bigadapt bench study`: BitFit vs adapters vs LoRA vs full fine-tuning across data fractions and time budgets.

The axes of the BitFit/adapters study (Doering et al. 2024, arXiv 2401.04051): GLUE MRPC, CoLA and STS-B,
a fraction of the training data (nested deterministic subsets) and a wall-clock training budget.

One run per (task, fraction, method). The schedule is warmup-then-constant, and the run evaluates the whole
dev set whenever the training clock (step time only, see `train.eval_at_s`) passes a mark: with a constant
schedule and per-step RNG, the eval at mark t is exactly the final eval of a run given budget t, so each run
gives every budget at the price of one. Cells are run one after another in one process each (ZeRO stage 0,
all cores), skipped when already complete, so an interrupted study continues where it stopped.

    python -m bigadapt.bench.study run --model DIR --glue ../shared/data/glue --out runs/study
    python -m bigadapt.bench.study report runs/study   # Markdown table + study.png
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .. import records as metrics_log

# Per-method settings for a small BERT on short runs: the usual LR ranges of each method's paper
# (full FT 1e-5..1e-4; LoRA, BitFit and adapters 1e-4..1e-3), above their high end for the PEFT methods:
# at 1e-3, 50 steps of LoRA or BitFit on MRPC had not left the majority class.
METHODS = {
    "full": {"method": {"name": "full"}, "lr": 1e-4},
    "lora": {"method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]}, "lr": 2e-3},
    "bitfit": {"method": {"name": "bitfit"}, "lr": 2e-3},
    "adapter_h": {"method": {"name": "adapter_h", "r": 16}, "lr": 2e-3},
}
TASKS = {"mrpc": ("glue/mrpc", 2), "cola": ("glue/cola", 2), "stsb": ("glue/stsb", 1)}
MAIN_METRIC = {"mrpc": "accuracy", "cola": "mcc", "stsb": "pearson"}
# what a model that always predicts the majority class (or a constant score) gets on the dev set
NO_SKILL = {"mrpc": 279 / 408, "cola": 0.0, "stsb": 0.0}
SHOWN = {"mrpc": ("accuracy", "f1"), "cola": ("mcc",), "stsb": ("pearson", "spearman")}


def cell_config(args, task: str, method: str, fraction: float) -> dict:
    spec = METHODS[method]
    return {
        "run_dir": str(Path(args.out) / f"{task}-{method}-f{fraction:g}-s{args.seed}"),
        "model": {"name_or_path": args.model, "objective": "seq_cls", "num_labels": TASKS[task][1]},
        "method": spec["method"],
        "data": {"task": TASKS[task][0], "path": args.glue, "seq_len": args.seq_len, "fraction": fraction},
        "train": {"batch_size": 32, "micro_batch": 32, "lr": spec["lr"], "warmup_steps": 10,
                  "schedule": "constant", "epochs": 100, "time_budget_s": args.budget,
                  "eval_at_s": [m for m in args.marks if m < args.budget], "log_every": 10, "seed": args.seed,
                  "keep_last": 1},
        "zero": {"stage": 0},
    }


def complete(run_dir: Path) -> bool:
    return (run_dir / "accounting.json").exists()  # written after the final eval and save


def run_cells(args) -> int:
    cfgs = [cell_config(args, task, method, fraction)
            for fraction in args.fractions for task in args.tasks for method in args.methods]
    return run_configs(Path(args.out), cfgs)


def run_configs(out: Path, cfgs: list[dict]) -> int:
    """Train each config in its own process, one after another, skipping complete runs (so an interrupted
    driver continues where it stopped); a log and the load beside each run go next to its YAML in `out`.
    A failed run does not stop the others; the exit code of the first failure is returned (0: none)."""
    first_failure = 0
    out.mkdir(parents=True, exist_ok=True)
    repo = Path(__file__).resolve().parents[2]
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["HF_HUB_OFFLINE"] = "1"  # a local model directory; never wait on the hub
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    for cfg in cfgs:
        run_dir = Path(cfg["run_dir"])
        if complete(run_dir):
            continue
        path = out / f"{run_dir.name}.yaml"
        path.write_text(yaml.safe_dump(cfg, sort_keys=False))
        t0, load0 = time.time(), os.getloadavg()[0]
        with open(out / f"{run_dir.name}.log", "w") as log:
            # --resume auto: a run the driver was stopped in continues from its checkpoint
            cmd = [sys.executable, str(repo / "launch/train.py"), "--config", str(path), "--resume", "auto"]
            rc = subprocess.run(cmd, env=env, cwd=repo, stdout=log, stderr=subprocess.STDOUT).returncode
        # the load beside each run: a wall-clock budget buys fewer steps on a busy machine
        cell = {"wall_s": round(time.time() - t0, 1), "load_start": load0, "load_end": os.getloadavg()[0],
                "exit": rc}
        (out / f"{run_dir.name}.cell.json").write_text(json.dumps(cell))
        status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {out / run_dir.name}.log)"
        first_failure = first_failure or rc
        print(f"{run_dir.name}: {status} in {cell['wall_s']:.0f} s, load {load0:.1f} -> "
              f"{cell['load_end']:.1f}", flush=True)
    return first_failure


def run_evals(run_dir: Path) -> list[dict]:
    """A run's eval records (metrics.jsonl), in the order it wrote them."""
    records = metrics_log.read(run_dir / "metrics.jsonl")  # a torn last line is dropped with a warning
    return [r for r in records if r.get("split") == "eval"]


def collect(out: Path) -> list[dict]:
    """One row per complete run: its cell and the evals at each training-clock mark."""
    rows = []
    for cfg_path in sorted(out.glob("*.yaml")):
        cfg = yaml.safe_load(cfg_path.read_text())
        run_dir = Path(cfg["run_dir"])
        if not complete(run_dir):
            continue
        evals = run_evals(run_dir)
        task = cfg["data"]["task"].split("/")[1]
        state = json.loads(next((run_dir / "checkpoints").glob("step-*/state.json")).read_text())
        side = out / f"{run_dir.name}.cell.json"
        cell = json.loads(side.read_text()) if side.exists() else {}
        rows.append({"task": task, "method": cfg["method"]["name"], "fraction": cfg["data"]["fraction"],
                     "seed": cfg["train"]["seed"], "budget": cfg["train"]["time_budget_s"],
                     "marks": cfg["train"]["eval_at_s"] + [cfg["train"]["time_budget_s"]], "evals": evals,
                     "steps": state["step"], "train_s": state["train_s"],
                     "step_s": state["train_s"] / max(1, state["step"]),
                     "trainable": _trainable(run_dir),
                     "load": max(cell.get("load_start", 0.0), cell.get("load_end", 0.0)) if cell else None})
    return rows


def _trainable(run_dir: Path) -> int:
    layout = json.loads((run_dir / "layout.json").read_text())
    return layout["trainable_numel_total"]


def table(rows: list[dict]) -> str:
    """Markdown: one line per (task, method), a column per (fraction, budget) with the task's metrics."""
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    marks = sorted({m for r in rows for m in r["marks"]})
    head = [f"{int(100 * f)}% · {m:g} s" for f in fractions for m in marks]
    # steps, s/step and load: the largest fraction's run
    lines = ["| task | method | trainable | " + " | ".join(head) + " | steps | s/step | load |",
             "| --- | --- | ---: | " + " | ".join("---:" for _ in head) + " | ---: | ---: | ---: |"]
    for task in TASKS:
        for method in METHODS:
            cell = {r["fraction"]: r for r in rows if r["task"] == task and r["method"] == method}
            if not cell:
                continue
            any_row = next(iter(cell.values()))
            vals = []
            for f in fractions:
                for m in marks:
                    ev = _eval_at(cell.get(f), m)
                    vals.append("/".join(f"{100 * ev[k]:.1f}" for k in SHOWN[task]) if ev else "–")
            full = cell.get(max(fractions), any_row)
            lines.append(f"| {task} ({'/'.join(SHOWN[task])}) | {method} | {any_row['trainable']:,} | "
                         + " | ".join(vals) + f" | {full['steps']} | {full['step_s']:.2f} | "
                         + (f"{full['load']:.1f} |" if full.get("load") is not None else "– |"))
    return "\n".join(lines)


def seeds_table(rows: list[dict]) -> str:
    """Markdown: the main metric per seed at each mark, for every (task, method, fraction) run with more than
    one seed, and the largest difference between seeds: how much of a gap in the main table is noise."""
    marks = sorted({m for r in rows for m in r["marks"]})
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    lines = ["| task | method | data | seeds | " + " | ".join(f"{m:g} s" for m in marks) + " | largest spread |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in marks) + " | ---: |"]
    for task, method, fraction in ((t, m, f) for t in TASKS for m in METHODS for f in fractions):
        by_seed = {r["seed"]: r for r in rows if (r["task"], r["method"], r["fraction"]) == (task, method, fraction)}
        if len(by_seed) < 2:
            continue
        metric, spread, vals = MAIN_METRIC[task], 0.0, []
        for m in marks:
            per_seed = [ev[metric] for s in sorted(by_seed) if (ev := _eval_at(by_seed[s], m)) and metric in ev]
            vals.append(" / ".join(f"{100 * v:.1f}" for v in per_seed) if per_seed else "–")
            spread = max([spread] + ([100 * (max(per_seed) - min(per_seed))] if per_seed else []))
        lines.append(f"| {task} ({metric}) | {method} | {int(100 * fraction)}% | "
                     f"{', '.join(str(s) for s in sorted(by_seed))} | " + " | ".join(vals) + f" | {spread:.1f} |")
    return "\n".join(lines) if len(lines) > 2 else ""


def _eval_at(row: dict | None, mark: float) -> dict | None:
    """The eval a run with budget `mark` ends with: the first eval at or past the mark on the training clock."""
    if row is None or mark not in row["marks"]:
        return None
    evals = sorted(row["evals"], key=lambda e: e["train_s"])
    past = [e for e in evals if e["train_s"] >= mark - 1e-6]
    return past[0] if past else evals[-1]


def run_parser(sub, summary: str, glue_holds: str, out: str) -> argparse.ArgumentParser:
    """The `run` subcommand of a driver over local GLUE runs: --model, --glue, --out."""
    r = sub.add_parser("run", help=summary)
    r.add_argument("--model", required=True, help="local model directory (e.g. all-MiniLM-L6-v2) or hub id")
    r.add_argument("--glue", required=True, help=f"folder holding {glue_holds}")
    r.add_argument("--out", default=out)
    return r


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="bigadapt bench study", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="what", required=True)
    r = run_parser(sub, "run the missing cells", "MRPC/, CoLA/, STS-B/", "runs/study")
    r.add_argument("--tasks", type=lambda s: s.split(","), default=list(TASKS))
    r.add_argument("--methods", type=lambda s: s.split(","), default=list(METHODS))
    r.add_argument("--fractions", type=lambda s: [float(x) for x in s.split(",")], default=[1.0, 0.3])
    r.add_argument("--budget", type=float, default=180.0, help="training-clock seconds per run")
    r.add_argument("--marks", type=lambda s: [float(x) for x in s.split(",")], default=[30.0, 60.0, 120.0],
                   help="also evaluate at these training-clock seconds (the smaller budgets)")
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--seed", type=int, default=0)
    rep = sub.add_parser("report", help="Markdown table and plot (mean of seeds, min..max band) of the complete cells")
    rep.add_argument("--format", choices=["png", "svg", "pdf"], default="png", help="the plot's file format")
    rep.add_argument("out")
    args = p.parse_args(argv)
    if args.what == "run":
        bad = [t for t in args.tasks if t not in TASKS] + [m for m in args.methods if m not in METHODS]
        if bad:
            p.error(f"unknown task/method {bad}; tasks: {','.join(TASKS)}; methods: {','.join(METHODS)}")
        return run_cells(args)
    rows = collect(Path(args.out))
    first = [r for r in rows if r["seed"] == min(x["seed"] for x in rows)] if rows else []
    print(table(first))  # one seed per cell; the others only measure the spread
    spread = seeds_table(rows)
    if spread:
        print(f"\nacross seeds (each task's main metric x 100, seed by seed):\n\n{spread}")
    from .study_plot import write_plot
    # every seed goes in: the plot draws each cell's mean with the seeds' min..max band
    out = write_plot(Path(args.out) / f"study.{args.format}", rows, MAIN_METRIC, NO_SKILL)
    print(f"\nplot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
