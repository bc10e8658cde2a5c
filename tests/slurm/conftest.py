"""Fixtures for tests against a real local SLURM (slurm/localhost/setup.sh): never a mocked sbatch."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SETUP = REPO_ROOT / "slurm" / "localhost" / "setup.sh"
JOB_PREFIX = "bigadapt-test-"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "slurm: needs a running SLURM (slurm/localhost/setup.sh, root)")


def _unavailable(reason: str) -> None:
    # In CI a missing cluster is a failure, never a silent skip.
    if os.environ.get("CI"):
        pytest.fail(f"SLURM test cluster unavailable in CI: {reason}", pytrace=False)
    pytest.skip(f"SLURM test cluster unavailable: {reason}")


@pytest.fixture(scope="session")
def slurm_cluster():
    """Runs setup.sh (idempotent: a no-op when the cluster is healthy); yields its status line. Daemons this
    session started are stopped again at its end (teardown.sh); a cluster that was already up stays up."""
    if os.geteuid() != 0:
        _unavailable("slurm/localhost/setup.sh must run as root")
    proc = subprocess.run(["bash", str(SETUP)], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        _unavailable(f"{SETUP} failed (exit {proc.returncode}): {proc.stderr.strip()[-2000:]}")
    _cancel_leftovers()
    status = proc.stdout.strip()
    yield status
    if "- started" in status:
        _cancel_leftovers()
        subprocess.run(["bash", str(SETUP.with_name("teardown.sh"))], capture_output=True, timeout=120, check=False)


def _cancel_leftovers() -> None:
    """Jobs of an interrupted earlier session would hold the two nodes."""
    out = subprocess.run(["squeue", "-h", "-o", "%i %j"], capture_output=True, text=True).stdout
    ids = [line.split()[0] for line in out.splitlines() if JOB_PREFIX in line]
    if ids:
        subprocess.run(["scancel", *ids], check=False)
        deadline = time.monotonic() + 60
        while _queued(ids) and time.monotonic() < deadline:
            time.sleep(0.5)


def _queued(ids: list[str]) -> bool:
    out = subprocess.run(["squeue", "-h", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    return bool(out.stdout.strip())
