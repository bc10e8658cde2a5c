"""A run directory belongs to one run (a lock), nothing is written into it before every check that can refuse the
run has passed, and a resume keeps the math of the run it continues (issue 21)."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

from bigadapt.rundir import LOCK, RunLock

from .conftest import check, run_cli, tiny_config, write_config


def _refused(proc: subprocess.CompletedProcess) -> str:
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    lines = [x for x in proc.stderr.strip().splitlines() if x.startswith("bigadapt: error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _files(run_dir) -> dict[str, bytes]:
    return {str(p.relative_to(run_dir)): p.read_bytes() for p in sorted(run_dir.rglob("*")) if p.is_file()}


def test_a_second_run_on_a_locked_directory_is_refused_naming_the_holder(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(run_dir, train={"max_steps": 2}))
    holder = RunLock(run_dir)  # a live run: this process holds the lock, as a training rank 0 would
    holder.acquire()
    try:
        line = _refused(run_cli("train", "--config", str(cfg)))
        assert "in use by another run" in line and f"pid {os.getpid()}" in line and socket.gethostname() in line
        assert sorted(p.name for p in run_dir.iterdir()) == [LOCK]  # nothing written by the refused run
    finally:
        holder.release()
    assert not (run_dir / LOCK).exists()  # a clean release: the next run takes over nothing


def test_a_lock_left_by_a_dead_run_is_taken_over(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    (run_dir / LOCK).write_text(json.dumps({"pid": int(dead.stdout), "host": socket.gethostname()}))
    cfg = write_config(tmp_path / "c.yaml", tiny_config(run_dir, train={"max_steps": 2}))
    proc = check(run_cli("train", "--config", str(cfg)))
    assert f"taking over the lock of an ended run (pid {int(dead.stdout)}" in proc.stdout + proc.stderr
    assert not (run_dir / LOCK).exists()  # released at the end


def test_a_bad_data_file_leaves_no_run_directory(tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text('{"text": "a b", "label": "x"}\n' * 8 + '{"text": "c d"}\n')
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(
        run_dir, data={"task": "cls", "path": str(data), "seq_len": 16, "eval_fraction": 0.25}))
    line = _refused(run_cli("train", "--config", str(cfg)))
    assert "train.jsonl" in line
    assert not run_dir.exists()


def test_resume_refuses_a_changed_optimisation_and_writes_nothing(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(run_dir, train={"max_steps": 2}))
    check(run_cli("train", "--config", str(cfg)))
    before = _files(run_dir)

    line = _refused(run_cli("train", "--config", str(cfg), "--resume", "auto", "--set", "train.lr=0.1",
                            "--set", "method.r=8", "--set", "train.log_every=2"))
    assert "train.lr (0.002 -> 0.1)" in line and "method.r (4 -> 8)" in line and "log_every" not in line
    assert "--allow-config-change method.r,train.lr" in line
    assert _files(run_dir) == before  # config.yaml (what a SLURM job resumes from) included

    typo = _refused(run_cli("train", "--config", str(cfg), "--resume", "auto", "--allow-config-change", "train.lrr"))
    assert "'train.lrr' is not a config key" in typo

    # extending the run and changing the lr when asked: the manifest says what was used, and from when
    check(run_cli("train", "--config", str(cfg), "--resume", "auto", "--set", "train.max_steps=4",
                  "--set", "train.lr=0.001", "--allow-config-change", "train.lr"))
    manifest = json.loads((run_dir / "checkpoints/step-00000004/manifest.json").read_text())
    assert manifest["config"]["train"]["lr"] == 0.001
    assert manifest["config_changes"] == [{"step": 2, "changes": {"train.lr": [0.002, 0.001],
                                                                  "train.max_steps": [2, 4]}}]
