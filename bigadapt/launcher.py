"""`bigadapt launch LAUNCHER ARGS...`: a stop signal to the command reaches every rank, and the command exits 3.

Neither launcher does this on its own (docs/slurm.md): the `deepspeed` runner dies on SIGTERM/SIGUSR1 and
leaves its ranks training as orphans; its per-node `deepspeed.launcher.launch` and `torchrun` answer SIGTERM by
terminating the ranks (SIGKILL 30 s later) and exit 1 whatever the ranks did; SIGUSR1 kills torchrun.

So the wrapper starts the launcher in a process group of its own (a signal to the wrapper's group reaches the
wrapper only), and passes SIGTERM/SIGUSR1 to the ranks alone: each rank registers its pid in a directory the
wrapper names in BIGADAPT_LAUNCH_DIR once its stop handler is installed (train.StopRequest). The ranks
checkpoint at the next step boundary and exit 3; the launcher ends, and the wrapper exits 3 (torchrun would
say 1: the ranks record their exit codes beside their pids). SIGINT/SIGHUP go to the launcher as before (abort).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path

from .errors import EXIT_PREEMPTED, ConfigError

ENV = "BIGADAPT_LAUNCH_DIR"
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)
ABORT_SIGNALS = (signal.SIGINT, signal.SIGHUP)


# ---------------------------------------------------------------- in the ranks
def _rank_file(suffix: str) -> Path | None:
    where = os.environ.get(ENV)
    return Path(where, f"rank-{os.environ.get('RANK', '0')}.{suffix}") if where else None


def register_rank() -> None:
    """Call once the stop handler is installed: from then on a signal the wrapper passes on is a stop request."""
    path = _rank_file("pid")
    if path:
        path.write_text(str(os.getpid()))


def record_exit(code: int) -> None:
    path = _rank_file("exit")
    if path:
        path.write_text(str(code))


# ---------------------------------------------------------------- the wrapper
def add_args(p) -> None:
    import argparse
    p.add_argument("launcher", metavar="LAUNCHER ARGS...", nargs=argparse.REMAINDER,
                   help="the launch command, e.g. deepspeed --num_gpus 2 launch/train.py --config X.yaml, or "
                        "torchrun --nproc-per-node 2 launch/train.py ...")


class _Forwarder:
    def __init__(self, proc: subprocess.Popen, where: Path):
        self.proc, self.where = proc, where
        self.stop: int | None = None
        self.sent: set[int] = set()

    def handle(self, signum, frame) -> None:
        if signum in ABORT_SIGNALS:
            _signal_group(self.proc.pid, signum)
            return
        self.stop = self.stop or signum  # the first stop signal is the one passed on; more change nothing
        self.pass_on()

    def pass_on(self) -> None:
        """To every registered rank not yet told (ranks that register later are told when they do)."""
        if self.stop is None:
            return
        for f in self.where.glob("rank-*.pid"):
            pid = int(f.read_text() or 0)
            if pid and pid not in self.sent:
                self.sent.add(pid)
                try:
                    os.kill(pid, self.stop)
                except ProcessLookupError:
                    pass


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass


def run(command: list[str]) -> int:
    if not command:
        raise ConfigError("launch: give the launch command, e.g. bigadapt launch deepspeed --num_gpus 2 "
                          "launch/train.py --config X.yaml")
    if shutil.which(command[0]) is None:
        raise ConfigError(f"launch: {command[0]!r} not found on PATH")
    where = Path(tempfile.mkdtemp(prefix="bigadapt-launch-"))
    try:
        proc = subprocess.Popen(command, env=dict(os.environ, **{ENV: str(where)}), start_new_session=True)
        fwd = _Forwarder(proc, where)
        for sig in STOP_SIGNALS + ABORT_SIGNALS:
            signal.signal(sig, fwd.handle)
        while True:
            try:
                code = proc.wait(timeout=0.5)
                break
            except subprocess.TimeoutExpired:
                fwd.pass_on()
        return _exit_code(code, fwd, where)
    finally:
        shutil.rmtree(where, ignore_errors=True)


def _exit_code(code: int, fwd: _Forwarder, where: Path) -> int:
    """3 when a stop was passed on and every rank that registered exited 0 or 3, at least one 3 (torchrun
    reports 1 for a rank's 3); else the launcher's own code (a signal as 128 + its number, as a shell says)."""
    ranks = {f.stem for f in where.glob("rank-*.pid")}
    codes = [int(f.read_text() or -1) for f in where.glob("rank-*.exit")]
    if fwd.stop is not None and ranks and len(codes) == len(ranks) and set(codes) <= {0, EXIT_PREEMPTED}:
        if EXIT_PREEMPTED in codes:
            print(f"bigadapt: stopped by {signal.Signals(fwd.stop).name}: the ranks checkpointed; rerun with "
                  f"--resume auto to continue", file=sys.stderr)
            return EXIT_PREEMPTED
    return code if code >= 0 else 128 - code
