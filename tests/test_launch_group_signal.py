"""A stop signal sent to the whole process group of `bigadapt launch ...` (what `kill -TERM -PGID`, a terminal's job
control or a batch system signalling a job step does) reaches every rank once, the launcher is not killed under
ranks that are still saving, and the command exits 3 once they have (issue 21: the launcher, signalled with its
ranks, returned -15 / -10 while they were still writing their checkpoint).

No DeepSpeed and no training: the launcher is a stand-in that dies on SIGTERM/SIGUSR1 at once, as the `deepspeed`
runner does (docs/slurm.md), and the rank registers with bigadapt.launcher as a training rank does and takes a
second to "save". The real launchers with real ranks: tests/distributed/test_launcher_signals.py."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import REPO, env

LAUNCHER = """
import subprocess, sys
sys.exit(subprocess.Popen([sys.executable, *sys.argv[1:]]).wait())  # default dispositions: a stop signal kills it
"""

RANK = """
import signal, sys, time
from pathlib import Path
from bigadapt import launcher
out, got = Path(sys.argv[1]), []
for s in (signal.SIGTERM, signal.SIGUSR1):
    signal.signal(s, lambda n, f: got.append(n))
launcher.register_rank()
(out / "ready").write_text("")
while not got:
    time.sleep(0.02)
time.sleep(1.0)  # the checkpoint being written
(out / "saved").write_text(",".join(map(str, got)))
launcher.record_exit(3)
sys.exit(3)
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_a_signal_to_the_launch_group_waits_for_the_ranks_and_exits_3(tmp_path, sig):
    (tmp_path / "launcher.py").write_text(LAUNCHER)
    (tmp_path / "rank.py").write_text(RANK)
    proc = subprocess.Popen([sys.executable, "-m", "bigadapt", "launch", sys.executable, str(tmp_path / "launcher.py"),
                             str(tmp_path / "rank.py"), str(tmp_path)], cwd=REPO, env=env(), start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 120  # only against a hang
        while not (tmp_path / "ready").exists():
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()[0][-3000:]
            time.sleep(0.02)
        os.killpg(proc.pid, sig)  # the wrapper's whole group, as a batch system or a shell sends it
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == 3, f"exit {proc.returncode}\n{out[-3000:]}"
    assert f"stopped by {sig.name}: the ranks checkpointed" in out
    assert (tmp_path / "saved").read_text() == str(int(sig))  # the rank finished saving, told once
