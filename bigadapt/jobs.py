"""`bigadapt submit` and `bigadapt status`: a run config becomes a SLURM job (or a job array for a sweep).

The job runs the same `launch/train.py --config <run_dir>/config.yaml --resume auto` a person would, so
a requeued job resumes from its newest checkpoint without being told to.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

from . import slurm
from .checkpoint import complete
from .config import dump_config, load_config
from .errors import ConfigError, SlurmError

TRAIN_SCRIPT = Path(__file__).resolve().parents[1] / "launch" / "train.py"


def parse_sweep(items: list[str]) -> list[list[str]]:
    """['method.r=4,8', 'train.seed=0,1'] -> the cartesian product as lists of KEY=VALUE overrides."""
    axes = []
    for item in items:
        key, sep, values = item.partition("=")
        if not sep or not key or not values:
            raise ConfigError(f"--sweep {item!r}: expected KEY=V1,V2,..., e.g. --sweep method.r=4,8,16")
        axes.append([f"{key}={v}" for v in values.split(",")])
    return [list(combo) for combo in itertools.product(*axes)] if axes else []


def _task_name(overrides: list[str]) -> str:
    return re.sub(r"[^\w.=+-]+", "_", "_".join(o.rsplit(".", 1)[-1] for o in overrides))


def build_spec(args) -> tuple[slurm.JobSpec, str]:
    """Validate the config (and every sweep point); the JobSpec and the resolved config.yaml text."""
    cfg = load_config(args.config, args.overrides)
    run_dir = Path(cfg.run_dir).resolve()
    sweep = parse_sweep(args.sweep)
    for point in sweep:  # every task's config must be valid before anything is queued
        load_config(args.config, [*args.overrides, *point])
    tasks = [slurm.TaskOverride(run_dir=str(run_dir / _task_name(p)),
                                args=[a for o in p for a in ("--set", o)] + ["--set", "run_dir={run_dir}"])
             for p in sweep]
    spec = slurm.JobSpec(
        name=args.name or f"bigadapt-{run_dir.name}", run_dir=str(run_dir),
        train_args=[str(TRAIN_SCRIPT), "--config", str(run_dir / "config.yaml"), "--resume", "auto"],
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, ranks_per_node=args.ranks_per_node,
        cpus_per_node=args.cpus_per_node or _default_cpus(args), time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, signal_lead_s=args.signal_lead,
        python=sys.executable, task_overrides=tasks)
    slurm.validate(spec)
    return spec, dump_config(load_config(args.config, [*args.overrides, f"run_dir={run_dir}"]))


def _default_cpus(args) -> int:
    ranks = args.ranks_per_node or args.gpus_per_node or 1
    return 4 * ranks if args.gpus_per_node else ranks  # data loading and the launcher need cores too


def submit(args) -> int:
    spec, config_text = build_spec(args)
    if args.dry_run:  # print the script; nothing is written or queued
        print(slurm.render_job_script(spec), end="")
        return 0
    script = _write(spec, config_text, Path(spec.run_dir) / "job.sbatch")
    job_id = slurm.submit(script)
    record = {"job_id": job_id, "script": str(script), "array": len(spec.task_overrides) or None}
    (Path(spec.run_dir) / "job.json").write_text(json.dumps(record, indent=1))
    print(job_id)
    return 0


def _write(spec: slurm.JobSpec, config_text: str, script: Path) -> Path:
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(config_text)
    return slurm.write_job_script(spec, script)


def status(run: str) -> int:
    """The job's state and the run's progress, read from the run directory (and scontrol if reachable)."""
    run_dir = Path(run)
    if not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"{run_dir}: not a bigadapt run directory (no config.yaml)")
    job = json.loads((run_dir / "job.json").read_text()) if (run_dir / "job.json").is_file() else {}
    dirs = sorted(p.parent for p in run_dir.glob("*/config.yaml")) if job.get("array") else [run_dir]
    if job:
        print(f"job {job['job_id']}: {_job_state(job['job_id'])}")
    for d in dirs:
        print(_progress_line(d))
    return 0


def _job_state(job_id: str) -> str:
    try:
        states = slurm.job_states(job_id)
    except SlurmError as e:  # scontrol missing or the job is forgotten: the run directory still tells
        return f"unknown to scontrol ({str(e).splitlines()[0]})"
    return ", ".join(f"{s.job_id} {s.state} restarts={s.restarts}" for s in states)


def _progress_line(run_dir: Path) -> str:
    last_step, last_eval = {}, {}
    metrics = run_dir / "metrics.jsonl"
    if metrics.is_file():
        for line in metrics.read_text().splitlines():
            rec = json.loads(line)
            (last_eval if rec.get("split") == "eval" else last_step).update(rec)
    events = slurm.read_events(run_dir)
    ckpts = complete(run_dir / "checkpoints")
    parts = [f"{run_dir.name}:"]
    parts.append(f"step {last_step['step']} loss {last_step['loss']:.4f}" if last_step else "no step yet")
    if "accuracy" in last_eval:
        parts.append(f"eval accuracy {last_eval['accuracy']:.3f} (step {last_eval['step']})")
    parts.append(f"checkpoint {ckpts[-1].name}" if ckpts else "no checkpoint")
    if events:
        parts.append(f"last event {events[-1]['event']} (restart {events[-1].get('restart', '0')})")
    return "  ".join(parts)
