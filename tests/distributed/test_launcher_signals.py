"""SIGTERM to `bigadapt launch deepspeed ...` reaches both ranks, they checkpoint at a step boundary, the command
exits 3, and --resume auto ends equal to an uninterrupted run (issue 21)."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import time

import pytest

from ..conftest import BIN, REPO, check, env, launch, tiny_config, train_losses, write_config

STEPS = 20


def _port() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


def _wait_for_step(run_dir, proc: subprocess.Popen, limit_s: float = 300) -> None:
    """Until rank 0 has logged a step (a deadline only against a hang, not a measure of speed)."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"the run ended (exit {proc.returncode}) before its first step was logged:\n"
                        f"{proc.stdout.read()[-4000:]}")
        path = run_dir / "metrics.jsonl"
        if path.exists() and any('"loss"' in x for x in path.read_text().splitlines()):
            return
        time.sleep(0.05)
    pytest.fail("no step logged")


def _config(run_dir) -> dict:
    return tiny_config(run_dir, train={"max_steps": STEPS, "save_every": 1, "keep_last": 2},
                       zero={"stage": 3, "param_persistence_threshold": 0})


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The uninterrupted run both launchers' resumed runs must equal (one launch for both)."""
    ref = tmp_path_factory.mktemp("signals") / "ref"
    check(launch(2, "--config", str(write_config(ref.parent / "r.yaml", _config(ref)))))
    return train_losses(ref)


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun"])
def test_sigterm_to_the_launcher_checkpoints_every_rank_and_exits_3(tmp_path, launcher, reference):
    cfg = _config(tmp_path / "run")
    run_dir = tmp_path / "run"
    path = write_config(tmp_path / "c.yaml", cfg)
    if launcher == "deepspeed":
        cmd = [str(BIN / "deepspeed"), "--num_gpus", "2", "--master_port", _port()]
    else:
        cmd = [str(BIN / "torchrun"), "--nproc-per-node", "2", "--master-port", _port()]
    # every step ends in a save that sleeps 3 x 0.2 s: the run cannot reach its end within the few steps it takes
    # the signal to land, however fast the machine (a floor on step time, no guess about it)
    proc = subprocess.Popen([sys.executable, "-m", "bigadapt", "launch", *cmd, "launch/train.py", "--config",
                             str(path)], cwd=REPO, env=dict(env(), BIGADAPT_FAULT_SAVE_DELAY="0.2"),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for_step(run_dir, proc)
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, out[-4000:]
    logged = max(train_losses(run_dir))
    assert 1 <= logged < STEPS
    assert f"stop requested (signal {int(signal.SIGTERM)}): checkpointed step {logged}" in out
    ckpt = run_dir / f"checkpoints/step-{logged:08d}"
    assert json.loads((ckpt / "state.json").read_text())["step"] == logged  # at the step boundary

    check(launch(2, "--config", str(path), "--resume", "auto"))
    assert train_losses(run_dir) == reference  # bitwise: same world size, exact resume
