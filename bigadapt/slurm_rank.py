"""The rank side of a bigadapt SLURM job: every rank runs as `python -m bigadapt.slurm_rank TRAIN_SCRIPT ARGS...`
(or `-m MODULE ARGS...`), which runs the trainer in this process and records its exit code in
$BIGADAPT_RANK_STATUS_DIR for the job script (bigadapt/templates/job.sbatch), so a preempted rank (exit 3) is told
apart from a failed one. The host side (specs, the job script, sbatch, job states) is bigadapt/slurm.py.
"""
from __future__ import annotations

import os
import runpy
import signal
import sys
from pathlib import Path

from bigadapt.errors import EXIT_PREEMPTED


def _stop_before_training(signum: int, frame: object) -> None:
    # Only reached if the trainer has not installed its own handler yet: nothing to save.
    raise SystemExit(EXIT_PREEMPTED)


def _exit_code(code: object) -> int:
    if code is None:
        return 0
    return code if isinstance(code, int) else 1


def _record_exit(code: int) -> bool:
    """Write this rank's exit code for the job script; False when there is nowhere to write it."""
    status_dir = os.environ.get("BIGADAPT_RANK_STATUS_DIR")
    if not status_dir:
        return False
    try:
        Path(status_dir, f"rank-{os.environ.get('RANK', '0')}").write_text(f"{code}\n")
    except OSError:
        return False
    return True


def rank_main(argv: list[str]) -> None:
    """Run the trainer (a script path, or `-m module`) in this process, recording its exit code."""
    if not argv:
        raise SystemExit("usage: python -m bigadapt.slurm_rank SCRIPT.py ARGS... | -m MODULE ARGS...")
    # The launcher ignores these (inherited); until the trainer sets handlers, stop cleanly.
    for sig in (signal.SIGUSR1, signal.SIGTERM):
        signal.signal(sig, _stop_before_training)
    try:
        _run_trainer(argv)
    except SystemExit as e:
        code = _exit_code(e.code)
        if not _record_exit(code) or code != EXIT_PREEMPTED:
            raise
        # Recorded for the job script. torchrun must see success: on a non-zero exit it would
        # stop this node's other ranks, which may still be writing their checkpoint shards.
        raise SystemExit(0) from None
    except BaseException:
        _record_exit(1)
        raise
    _record_exit(0)


def _run_trainer(argv: list[str]) -> None:
    if argv[0] == "-m":
        sys.argv = argv[1:]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
    else:
        sys.argv = argv
        sys.path[0] = os.path.dirname(os.path.abspath(argv[0]))  # as `python SCRIPT` does
        runpy.run_path(argv[0], run_name="__main__")


if __name__ == "__main__":
    rank_main(sys.argv[1:])
