"""Stand-in for launch/train.py in the SLURM tests: same process contract, no model.

Each rank records its environment, joins a gloo process group (so MASTER_ADDR/PORT and
WORLD_SIZE must really work across nodes), and counts steps. On SIGUSR1/SIGTERM all ranks agree
(all-reduce) to stop at the next step boundary, rank 0 writes a checkpoint, and every rank exits 3.
A restart resumes from the checkpoint. `total` (a sum over steps) shows resume is exact.
`--hold-at N` waits after step N for that signal: the test sends it on seeing step N in progress.json, so it
lands at step N on a fast or a loaded machine alike.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

EXIT_PREEMPTED = 3
STOP = {"signal": ""}


def on_signal(signum: int, frame: object) -> None:
    STOP["signal"] = signal.Signals(signum).name  # acted on at the next step boundary


def hold_for_signal(limit_s: float = 60) -> None:
    """Bounded: a test that never signals still gets its job back (and fails on what it asserts)."""
    deadline = time.monotonic() + limit_s
    while not STOP["signal"] and time.monotonic() < deadline:
        time.sleep(0.05)


def write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data))
    os.replace(tmp, path)  # atomic: a kill never leaves half a checkpoint


def record_env(run_dir: Path, rank: int) -> None:
    keys = [
        "RANK",
        "WORLD_SIZE",
        "LOCAL_RANK",
        "MASTER_ADDR",
        "MASTER_PORT",
        "SLURM_NODEID",
        "SLURM_RESTART_COUNT",
        "SLURM_JOB_ID",
        "SLURM_ARRAY_TASK_ID",
        "OMP_NUM_THREADS",
    ]
    env = {k: os.environ.get(k) for k in keys} | {"host": socket.gethostname(), "argv": sys.argv}
    print(f"fake_trainer: {env}", flush=True)
    restart = os.environ.get("SLURM_RESTART_COUNT", "0")
    (run_dir / "ranks").mkdir(exist_ok=True)
    write_json(run_dir / "ranks" / f"rank-{rank}.restart-{restart}.json", env)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--hold-at", type=int, default=0, help="after this step, wait for SIGUSR1/SIGTERM")
    p.add_argument("--ckpt-time", type=float, default=0.0, help="seconds a checkpoint takes")
    p.add_argument("--fail-at", type=int, default=-1, help="exit with --fail-code at this step")
    p.add_argument("--fail-code", type=int, default=5)
    args = p.parse_args()
    signal.signal(signal.SIGUSR1, on_signal)
    signal.signal(signal.SIGTERM, on_signal)

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    run_dir = args.run_dir
    record_env(run_dir, rank)
    ckpt_path = run_dir / "ckpt.json"
    state = json.loads(ckpt_path.read_text()) if ckpt_path.exists() else {"step": 0, "total": 0}
    step, total = state["step"], state["total"]

    while step < args.steps:
        step += 1
        total += step * dist.get_world_size()
        if step == args.fail_at:
            return args.fail_code
        if rank == 0:
            write_json(run_dir / "progress.json", {"step": step})
        if step == args.hold_at:
            hold_for_signal()
        stop = torch.tensor([1 if STOP["signal"] else 0])
        dist.all_reduce(stop, op=dist.ReduceOp.MAX)  # every rank stops at the same step
        if stop.item():
            time.sleep(args.ckpt_time)
            if rank == 0:
                write_json(ckpt_path, {"step": step, "total": total})
                print(f"fake_trainer: {STOP['signal'] or 'peer'} -> checkpoint at step {step}", flush=True)
            dist.barrier()
            dist.destroy_process_group()
            return EXIT_PREEMPTED

    if rank == 0:
        write_json(run_dir / "done.json", {"step": step, "total": total})
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
