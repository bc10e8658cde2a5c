"""The real trainer under real SLURM: 2 emulated nodes, ZeRO-3 across them, preemption + requeue, sweeps.

Submitted with `bigadapt submit` exactly as a user would; the job runs launch/train.py.
"""
from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint
from bigadapt.slurm import read_events

from ..conftest import run_cli, tiny_config, write_config
from .test_slurm_launch import wait_job, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.usefixtures("slurm_cluster")]
STEPS = 150


def _submit(tmp: Path, name: str, *args: str, extra_env: dict | None = None, **sections) -> tuple[str, Path]:
    run_dir = tmp / name
    sections.setdefault("train", {"max_steps": STEPS, "log_every": 1, "keep_last": 2})
    cfg = write_config(tmp / f"{name}.yaml", tiny_config(run_dir, **sections))
    proc = run_cli("submit", "--config", str(cfg), "--time", "00:10:00", "--name", f"bigadapt-test-{name}", *args,
                   extra_env=extra_env)  # sbatch exports the submitting environment to the job
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip().splitlines()[-1], run_dir


def _adapter(run_dir: Path) -> dict:
    return load_file(checkpoint.complete(run_dir / "checkpoints")[-1] / "adapter.safetensors")


def _last_step(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return max((json.loads(x).get("step", 0) for x in lines if x), default=0)


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    job, run_dir = _submit(tmp_path_factory.mktemp("ref"), "ref", "--nodes", "2")
    (state,) = wait_job(job, timeout=300)
    assert state.state == "COMPLETED", (run_dir / "logs").glob("*.out")
    return run_dir


def test_two_nodes_train_one_zero3_world(reference):
    layout = json.loads((reference / "layout.json").read_text())
    assert layout["world_size"] == 2
    assert all(abs(r["base_numel"] - layout["base_numel_total"] / 2) <= 60 for r in layout["ranks"])
    assert [e["event"] for e in read_events(reference)] == ["start", "finish"]
    assert _last_step(reference) == STEPS


def test_preempted_job_requeues_and_ends_with_the_same_adapter(reference, tmp_path):
    # >= 0.1 s a step: 150 steps take >= 15 s, so the signal sent after step 5 always lands mid-run, on any machine
    job, run_dir = _submit(tmp_path, "preempt", "--nodes", "2", extra_env={"BIGADAPT_FAULT_STEP_DELAY": "0.1"})
    wait_until(lambda: _last_step(run_dir) >= 5, 300, "training to pass step 5")
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)  # what --signal=B:USR1 sends
    (state,) = wait_job(job, timeout=300)
    assert state.state == "COMPLETED" and state.restarts == 1
    events = [e["event"] for e in read_events(run_dir)]
    assert events[:4] == ["start", "signal", "preempted", "requeue"] and events[-2:] == ["start", "finish"]
    stopped = [c for c in checkpoint.complete(run_dir / "checkpoints")]
    assert stopped[-1].name == f"step-{STEPS:08d}"
    ref, got = _adapter(reference), _adapter(run_dir)
    assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)  # bitwise on CPU


def test_sweep_runs_one_array_task_per_point(tmp_path):
    job, run_dir = _submit(tmp_path, "sweep", "--sweep", "method.r=2,4,8", train={"max_steps": 3})
    states = wait_job(job, timeout=300)
    assert len(states) == 3 and all(s.state == "COMPLETED" for s in states)
    for r in (2, 4, 8):
        task = run_dir / f"r={r}"
        assert _adapter(task)["transformer.h.0.attn.c_attn.lora_A"].shape == (2 * r, 64)
    out = run_cli("status", str(run_dir)).stdout
    assert out.count("checkpoint step-00000003") == 3 and f"job {job}" in out


def test_submit_errors_are_one_line(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run"))
    proc = run_cli("submit", "--config", str(cfg), "--sweep", "method.r=4,0")
    assert proc.returncode == 2 and "method.r=0" in proc.stderr  # every sweep point is checked first
    proc = run_cli("submit", "--config", str(cfg), "--partition", "nosuch")
    assert proc.returncode == 2 and "invalid partition" in proc.stderr.lower() and "hint:" in proc.stderr
