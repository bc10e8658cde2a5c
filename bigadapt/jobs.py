"""`bigadapt submit` and `bigadapt status`: a run config becomes a SLURM job (or a job array for a sweep).

The job runs the same `bigadapt train --config <run_dir>/config.yaml --resume auto` a person would (as
`python -m bigadapt train`, which works from a checkout and from an installed wheel alike), so a requeued
job resumes from its newest checkpoint without being told to.
"""
from __future__ import annotations

import itertools
import json
import re
import sys
from pathlib import Path

from . import records, slurm
from .checkpoint import complete
from .config import dump_config, load_config
from .errors import ConfigError, SlurmError

TRAIN_COMMAND = ["-m", "bigadapt", "train"]


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
        train_args=[*TRAIN_COMMAND, "--config", str(run_dir / "config.yaml"), "--resume", "auto"],
        nodes=args.nodes, gpus_per_node=args.gpus_per_node, ranks_per_node=args.ranks_per_node,
        cpus_per_node=args.cpus_per_node or _default_cpus(args), time=args.time, partition=args.partition,
        account=args.account, qos=args.qos, constraint=args.constraint, mem=args.mem, signal_lead_s=args.signal_lead,
        python=sys.executable, task_overrides=tasks)
    slurm.validate(spec)
    _check_cpu_job(cfg, spec, args.mem)
    return spec, dump_config(load_config(args.config, [*args.overrides, f"run_dir={run_dir}"]))


# A CPU job is the default (--gpus-per-node 0); without --mem it is planned against this much per rank, so that
# a GPU-sized config (GPT-3 175B, a 7B base) is not rendered into a job that can only die of memory.
CPU_RANK_MEMORY = 64 * 2**30


def _check_cpu_job(cfg, spec: slurm.JobSpec, mem: str | None) -> None:
    """A CPU job whose predicted per-rank memory exceeds the node's is refused in one line, before anything is
    written: the user meant GPUs, or must say how much memory the CPU nodes have."""
    if spec.gpus_per_node:
        return
    from . import accounting
    from .engine import zero_stage
    from .estimate_cli import parse_size
    world = spec.nodes * spec.rank_count
    shape, _ = accounting.shapes(cfg)
    layout = accounting.Layout(world, zero_stage(cfg, world), cfg.train.micro_batch, cfg.data.seq_len, device="cpu")
    need = accounting.per_rank(shape, cfg, layout)["total"]
    per_node = parse_size(mem, "--mem") if mem and mem != "0" else None
    have = per_node // spec.rank_count if per_node else CPU_RANK_MEMORY
    if need > have:
        raise ConfigError(f"--gpus-per-node=0: a CPU job of this config needs {need / 2**30:,.1f} GiB per rank on "
                          f"{world} rank(s), more than {have / 2**30:,.0f} GiB "
                          f"({'--mem per rank' if per_node else 'assumed without --mem'}); pass --gpus-per-node "
                          f"(see `bigadapt estimate --gpu-memory 80GB --fit`), or --mem if your CPU nodes hold it")


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


def _warn(message: str) -> None:
    print(message, file=sys.stderr)


def _progress_line(run_dir: Path) -> str:
    last_step, last_eval = {}, {}
    for rec in records.read(run_dir / "metrics.jsonl", warn=_warn):  # a torn last line: dropped, said on stderr
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
