"""`bigadapt bench study`: BitFit vs adapters vs LoRA vs full fine-tuning across data fractions and time budgets.

The axes of the BitFit/adapters study (Doering et al. 2024, arXiv 2401.04051): GLUE MRPC, CoLA and STS-B,
a fraction of the training data (nested deterministic subsets) and a training budget.

One run per (task, fraction, method, seed). The schedule is warmup-then-constant, and the run evaluates the
whole dev set at each mark: with a constant schedule and per-step RNG, the eval at mark t is exactly the final
eval of a run given budget t, so each run gives every budget at the price of one. The budget is counted in
optimizer steps (`--steps`, the default: the result does not depend on how busy the machine is, so a second
person gets the same numbers) or in seconds of the training clock (`--budget`, step time only, see
`train.eval_at_s`: the study paper's axis, but it also measures the machine). Each cell is one process (ZeRO
stage 0), `--jobs` of them at a time with the cores split between them; complete cells are skipped, so an
interrupted study continues where it stopped.

    python -m bigadapt.bench.study run --model DIR --glue ../shared/data/glue --out runs/study
    python -m bigadapt.bench.study report runs/study   # Markdown table + study.png
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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


# Step budgets per task: about what 180 s of training reached on this 2-core CPU (docs/results.md), evaluated at
# each third. CoLA's sentences are short, so its steps are ~3x cheaper.
STEPS = {"mrpc": 120, "stsb": 120, "cola": 360}


def cell_config(args, task: str, method: str, fraction: float) -> dict:
    spec = METHODS[method]
    name = f"{task}-{method}-f{fraction:g}-s{args.seed}"
    if args.steps:
        train = {"max_steps": args.steps[task], "eval_every": args.steps[task] // args.evals}
        name += f"-n{args.steps[task]}"
    else:
        train = {"epochs": 100, "time_budget_s": args.budget, "eval_at_s": [m for m in args.marks if m < args.budget]}
    return {
        "run_dir": str(Path(args.out) / name),
        "model": {"name_or_path": args.model, "objective": "seq_cls", "num_labels": TASKS[task][1]},
        "method": spec["method"],
        "data": {"task": TASKS[task][0], "path": args.glue, "seq_len": args.seq_len, "fraction": fraction},
        "train": {"batch_size": 32, "micro_batch": 32, "lr": spec["lr"], "warmup_steps": 10,
                  "schedule": "constant", **train, "log_every": 10, "seed": args.seed, "keep_last": 1},
        "zero": {"stage": 0},
    }


def complete(run_dir: Path) -> bool:
    return (run_dir / "accounting.json").exists()  # written after the final eval and save


def run_cells(args) -> int:
    cfgs = [cell_config(args, task, method, fraction)
            for fraction in args.fractions for task in args.tasks for method in args.methods]
    return run_configs(Path(args.out), cfgs, jobs=args.jobs)


def run_configs(out: Path, cfgs: list[dict], jobs: int = 1) -> int:
    """Train each config in its own process, `jobs` at a time (the cores split between them), skipping complete
    runs (so an interrupted driver continues where it stopped); a log, the threads and the load beside each run
    go next to its YAML in `out`. A failed run does not stop the others; the exit code of the first failure is
    returned (0: none)."""
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env["HF_HUB_OFFLINE"] = "1"  # a local model directory; never wait on the hub
    # Two 1-thread processes did 1.35x the steps of one 2-thread process on 2 cores (MiniLM, batch 32).
    # The thread count is recorded: it changes the float summation order, so results match only at equal threads.
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // jobs)))
    todo = [cfg for cfg in cfgs if not complete(Path(cfg["run_dir"]))]
    running: list[tuple[subprocess.Popen, Path, dict]] = []
    first_failure = 0
    while todo or running:
        while todo and len(running) < jobs:
            running.append(_start(out, todo.pop(0), env))
        time.sleep(0.5)
        for job in [j for j in running if j[0].poll() is not None]:
            running.remove(job)
            first_failure = first_failure or _finish(out, *job, threads=env["OMP_NUM_THREADS"])
    return first_failure


def _start(out: Path, cfg: dict, env: dict) -> tuple[subprocess.Popen, Path, dict]:
    run_dir = Path(cfg["run_dir"])
    path = out / f"{run_dir.name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    repo = Path(__file__).resolve().parents[2]
    # --resume auto: a run the driver was stopped in continues from its checkpoint
    cmd = [sys.executable, str(repo / "launch/train.py"), "--config", str(path), "--resume", "auto"]
    with open(out / f"{run_dir.name}.log", "w") as log:
        proc = subprocess.Popen(cmd, env=env, cwd=repo, stdout=log, stderr=subprocess.STDOUT)
    return proc, run_dir, {"t0": time.time(), "load_start": os.getloadavg()[0]}


def _finish(out: Path, proc: subprocess.Popen, run_dir: Path, started: dict, threads: str) -> int:
    rc = proc.returncode
    # the load beside each run: a wall-clock budget buys fewer steps on a busy machine
    cell = {"wall_s": round(time.time() - started["t0"], 1), "load_start": started["load_start"],
            "load_end": os.getloadavg()[0], "threads": int(threads), "exit": rc}
    (out / f"{run_dir.name}.cell.json").write_text(json.dumps(cell))
    status = "ok" if rc == 0 else f"FAILED (exit {rc}, see {out / run_dir.name}.log)"
    print(f"{run_dir.name}: {status} in {cell['wall_s']:.0f} s, load {cell['load_start']:.1f} -> "
          f"{cell['load_end']:.1f}", flush=True)
    return rc


def run_evals(run_dir: Path) -> list[dict]:
    """A run's eval records (metrics.jsonl), in the order it wrote them."""
    records = metrics_log.read(run_dir / "metrics.jsonl")  # a torn last line is dropped with a warning
    return [r for r in records if r.get("split") == "eval"]


def collect(out: Path) -> list[dict]:
    """One row per complete run: its cell, its budget's unit ("steps" or "s") and the evals at each mark."""
    rows = []
    for cfg_path in sorted(out.glob("*.yaml")):
        cfg = yaml.safe_load(cfg_path.read_text())
        run_dir = Path(cfg["run_dir"])
        if not complete(run_dir):
            continue
        t = cfg["train"]
        task = cfg["data"]["task"].split("/")[1]
        state = json.loads(next((run_dir / "checkpoints").glob("step-*/state.json")).read_text())
        side = out / f"{run_dir.name}.cell.json"
        cell = json.loads(side.read_text()) if side.exists() else {}
        if t.get("time_budget_s"):
            unit, budget, marks = "s", t["time_budget_s"], t.get("eval_at_s", []) + [t["time_budget_s"]]
        else:
            unit, budget = "steps", t["max_steps"]
            every = t.get("eval_every") or budget
            marks = list(range(every, budget, every)) + [budget]
        rows.append({"task": task, "method": cfg["method"]["name"], "fraction": cfg["data"]["fraction"],
                     "seed": t["seed"], "unit": unit, "budget": budget, "marks": marks, "evals": run_evals(run_dir),
                     "steps": state["step"], "train_s": state["train_s"],
                     "step_s": state["train_s"] / max(1, state["step"]),
                     "trainable": _trainable(run_dir), "threads": cell.get("threads"),
                     "load": max(cell.get("load_start", 0.0), cell.get("load_end", 0.0)) if cell else None})
    return rows


def _trainable(run_dir: Path) -> int:
    layout = json.loads((run_dir / "layout.json").read_text())
    return layout["trainable_numel_total"]


def groups(rows: list[dict]) -> list[tuple[str, list[float], list[dict]]]:
    """(unit, marks, rows) for each set of tasks that share their budget's unit and marks: one table each
    (a step budget differs by task; the seconds of a time budget are the same for all)."""
    keyed: dict = {}
    for r in rows:
        keyed.setdefault((r.get("unit", "s"), tuple(sorted(r["marks"]))), []).append(r)
    return [(unit, list(marks), rs) for (unit, marks), rs in keyed.items()]


def table(rows: list[dict]) -> str:
    """Markdown: per group of tasks with the same marks, one line per (task, method), a column per (fraction,
    budget) with the task's metrics."""
    return "\n\n".join(_table(unit, marks, rs) for unit, marks, rs in groups(rows))


def _table(unit: str, marks: list[float], rows: list[dict]) -> str:
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    head = [f"{int(100 * f)}% · {m:g} {unit}" for f in fractions for m in marks]
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


def _cells(rows: list[dict]):
    """((task, method, fraction), {seed: row}) for every cell, in the tables' order."""
    fractions = sorted({r["fraction"] for r in rows}, reverse=True)
    for key in ((t, m, f) for t in TASKS for m in METHODS for f in fractions):
        by_seed = {r["seed"]: r for r in rows if (r["task"], r["method"], r["fraction"]) == key}
        if by_seed:
            yield key, by_seed


def seeds_table(rows: list[dict]) -> str:
    """Markdown: the main metric per seed at each mark, for every (task, method, fraction) run with more than
    one seed, and the largest difference between seeds: how much of a gap in the main table is noise."""
    return "\n\n".join(t for t in (_seeds_table(u, m, rs) for u, m, rs in groups(rows)) if t)


def _seeds_table(unit: str, marks: list[float], rows: list[dict]) -> str:
    lines = ["| task | method | data | seeds | " + " | ".join(f"{m:g} {unit}" for m in marks) + " | largest spread |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in marks) + " | ---: |"]
    for (task, method, fraction), by_seed in _cells(rows):
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


def mean_table(rows: list[dict]) -> str:
    """Markdown: the study's result over seeds. Each cell is the main metric's mean over the seeds with their
    min..max in brackets (with 3 seeds no interval is worth computing: the range is the honest spread), and the
    last column every shown metric's mean at the full budget."""
    return "\n\n".join(_mean_table(u, m, rs) for u, m, rs in groups(rows))


def _mean_table(unit: str, marks: list[float], rows: list[dict]) -> str:
    lines = ["| task | method | data | seeds | " + " | ".join(f"{m:g} {unit}" for m in marks)
             + " | all metrics, mean at the budget |",
             "| --- | --- | ---: | ---: | " + " | ".join("---:" for _ in marks) + " | ---: |"]
    for (task, method, fraction), by_seed in _cells(rows):
        metric, vals = MAIN_METRIC[task], []
        for m in marks:
            per_seed = [100 * ev[metric] for s in sorted(by_seed) if (ev := _eval_at(by_seed[s], m)) and metric in ev]
            vals.append(f"{statistics.mean(per_seed):.1f} [{min(per_seed):.1f}, {max(per_seed):.1f}]"
                        if len(per_seed) > 1 else (f"{per_seed[0]:.1f}" if per_seed else "–"))
        last = [ev for s in sorted(by_seed) if (ev := _eval_at(by_seed[s], marks[-1]))]
        final = "/".join(f"{100 * statistics.mean(e[k] for e in last):.1f}" for k in SHOWN[task]) if last else "–"
        lines.append(f"| {task} ({metric}) | {method} | {int(100 * fraction)}% | "
                     f"{', '.join(str(s) for s in sorted(by_seed))} | " + " | ".join(vals) + f" | {final} |")
    return "\n".join(lines)


def _eval_at(row: dict | None, mark: float) -> dict | None:
    """The eval a run with budget `mark` ends with: on the step clock the eval at that step; on the training
    clock the first eval at or past the mark."""
    if row is None or mark not in row["marks"]:
        return None
    if row.get("unit") == "steps":
        return next((e for e in row["evals"] if e["step"] == mark), None)
    evals = sorted(row["evals"], key=lambda e: e["train_s"])
    past = [e for e in evals if e["train_s"] >= mark - 1e-6]
    return past[0] if past else evals[-1]


def _steps(text: str) -> dict[str, int]:
    """`--steps 120` (every task) or `--steps mrpc=120,cola=360` (the others keep their default)."""
    if "=" not in text:
        return {t: int(text) for t in TASKS}
    return {**STEPS, **{k: int(v) for k, v in (kv.split("=", 1) for kv in text.split(","))}}


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
    r.add_argument("--steps", type=_steps, default=dict(STEPS),
                   help="optimizer steps per run: N for every task, or task=N,... (default: "
                        + ",".join(f"{t}={n}" for t, n in STEPS.items()) + ")")
    r.add_argument("--evals", type=int, default=3, help="with --steps: evaluate at each 1/EVALS of the budget")
    r.add_argument("--budget", type=float, default=None,
                   help="a budget in training-clock seconds instead of steps (the study paper's axis; it also "
                        "measures the machine: a busy one buys fewer steps)")
    r.add_argument("--marks", type=lambda s: [float(x) for x in s.split(",")], default=[30.0, 60.0, 120.0],
                   help="with --budget: also evaluate at these training-clock seconds (the smaller budgets)")
    r.add_argument("--jobs", type=int, default=1, help="cells trained at once, the cores split between them")
    r.add_argument("--seq-len", type=int, default=128)
    r.add_argument("--seed", type=int, default=0)
    rep = sub.add_parser("report", help="Markdown table and plot (mean of seeds, min..max band) of the complete cells")
    rep.add_argument("--format", choices=["png", "svg", "pdf"], default="png", help="the plot's file format")
    rep.add_argument("out")
    args = p.parse_args(argv)
    if args.what == "run":
        bad = [t for t in args.tasks if t not in TASKS] + [m for m in args.methods if m not in METHODS]
        bad += [t for t in (args.steps or {}) if t not in TASKS]
        if args.jobs < 1:
            p.error(f"--jobs {args.jobs}: at least 1 cell at a time")
        if bad:
            p.error(f"unknown task/method {bad}; tasks: {','.join(TASKS)}; methods: {','.join(METHODS)}")
        if args.budget is not None:
            args.steps = None
        elif any(n < args.evals or n % args.evals for n in args.steps.values()):
            p.error(f"--steps {args.steps}: each budget must be a multiple of --evals {args.evals}")
        return run_cells(args)
    rows = collect(Path(args.out))
    if len({r["seed"] for r in rows}) > 1:
        print("mean over seeds [min, max] (each task's main metric x 100):\n")
        print(mean_table(rows))
        print(f"\nseed by seed:\n\n{seeds_table(rows)}\n\nthe first seed, every metric:\n")
    first = [r for r in rows if r["seed"] == min(x["seed"] for x in rows)] if rows else []
    print(table(first))
    from .study_plot import write_plot
    # every seed goes in: the plot draws each cell's mean with the seeds' min..max band
    out = write_plot(Path(args.out) / f"study.{args.format}", rows, MAIN_METRIC, NO_SKILL)
    print(f"\nplot: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
