"""A run directory nothing can corrupt: divergence, torn logs, foreign manifests, damaged files, full disks and
unwritable paths, each through the real CLI with its exit code and one line."""
from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint
from bigadapt.errors import EXIT_DIVERGED, EXIT_USER_ERROR, DivergedError

from .conftest import TINY_GPT2, check, metrics, run_cli, tiny_config, write_config


def _config(tmp: Path, run_dir: Path, name: str = "cfg.yaml", **train) -> Path:
    train = {"max_steps": 4, "save_every": 2, "keep_last": 2, "track": [], **train}
    return write_config(tmp / name, tiny_config(run_dir, train=train))


def _error_line(proc: subprocess.CompletedProcess) -> str:
    """The one line a failed command says; no traceback anywhere."""
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr[-3000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("bigadapt: error")]
    assert len(lines) == 1, proc.stderr[-3000:]
    return lines[0]


def _copy_run(trained_run: Path, tmp: Path) -> tuple[Path, Path]:
    """A private copy of the shared run (8 steps, checkpoints at 4 and 8) and a config that continues it."""
    run_dir = tmp / "run"
    shutil.copytree(trained_run, run_dir, ignore=shutil.ignore_patterns(".lock"))
    cfg = write_config(tmp / "cfg.yaml", tiny_config(run_dir, train={"save_every": 4, "keep_last": 3}))
    return run_dir, cfg


# ---------------------------------------------------------------- divergence
def test_nan_loss_stops_the_run_keeps_the_last_good_checkpoint_and_resumes_from_it(tmp_path):
    run_dir = tmp_path / "run"
    cfg = _config(tmp_path, run_dir, max_steps=12, save_every=1, keep_last=2, lr=1e10, log_every=1)
    proc = run_cli("train", "--config", str(cfg))
    assert proc.returncode == EXIT_DIVERGED, proc.stderr[-3000:]
    line = _error_line(proc)
    assert ": diverged: " in line and "--resume auto" in line
    bad = int(line.split("step ")[1].split(":")[0])  # "bigadapt: error: step N: diverged: ..."
    kept = checkpoint.complete(run_dir / "checkpoints")
    assert kept and all(int(c.name.split("-")[1]) < bad for c in kept)  # nothing saved from the diverged step on
    for c in kept:  # and what was kept is finite
        tensors = {**load_file(c / "adapter.safetensors"), **load_file(c / "optimizer.safetensors")}
        assert all(torch.isfinite(t).all() for t in tensors.values())
    last = metrics(run_dir)[-1]  # the diverged step is on record, with what went wrong
    assert last["step"] == bad and not (math.isfinite(last["loss"]) and math.isfinite(last.get("grad_norm", 0)))

    # --resume auto starts from the newest good checkpoint (and, at this lr, diverges again the same way)
    again = run_cli("train", "--config", str(cfg), "--resume", "auto")
    assert again.returncode == EXIT_DIVERGED and f"resumed from {kept[-1]}" in again.stdout + again.stderr
    assert _error_line(again) == line
    assert checkpoint.complete(run_dir / "checkpoints") == kept


class _Cfg:  # the keys the guard reads
    def __init__(self, **train):
        self.train = type("T", (), {"max_loss_spike": 0.0, "max_skipped_steps": 20, **train})()


def _guard(**train):
    from bigadapt.loop import Loop
    loop = Loop.__new__(Loop)  # the guard alone: no engine
    loop.cfg, loop.rank = _Cfg(**train), 1  # rank 1: writes no metrics
    loop.skipped, loop.skipped_in_row, loop.applied, loop.loss_level, loop.losses_seen = 0, 0, True, 0.0, 0
    return loop


def test_skipped_steps_are_counted_and_too_many_in_a_row_stop():
    """fp16 overflow cannot happen on CPU (no fp16 there): DeepSpeed's verdict is set as Loop.step reads it."""
    loop = _guard(max_skipped_steps=3)
    for step, applied in enumerate([True, False, False, True, False, False], 1):
        loop.applied = applied
        record = {"step": step, "loss": 1.0, "grad_norm": float("inf") if not applied else 1.0}
        loop._guard(record)  # a skipped step's infinite norm is an overflow, not a divergence
    assert record["skipped_steps"] == 4 and loop.skipped_in_row == 2
    loop.applied = False
    with pytest.raises(DivergedError, match="skipped the last 3 steps on overflow"):
        loop._guard({"step": 7, "loss": 1.0})


def test_a_loss_spike_stops_when_asked():
    loop = _guard(max_loss_spike=5.0)
    for step in range(1, 12):
        loop._guard({"step": step, "loss": 1.0, "grad_norm": 1.0})
    with pytest.raises(DivergedError, match="over train.max_loss_spike=5"):
        loop._guard({"step": 12, "loss": 6.0, "grad_norm": 1.0})
    with pytest.raises(DivergedError, match="gradient norm is nan"):
        _guard()._guard({"step": 1, "loss": 1.0, "grad_norm": float("nan")})


def test_a_checkpoint_is_never_written_from_non_finite_tensors(tmp_path):
    with pytest.raises(DivergedError, match="w.exp_avg is not finite"):
        checkpoint._check_finite(3, {"w": torch.ones(2), "w.exp_avg": torch.tensor([1.0, float("inf")])})


# ---------------------------------------------------------------- torn and foreign files
def test_a_torn_metrics_line_is_dropped_by_status_resume_and_readers(trained_run, tmp_path):
    run_dir, cfg = _copy_run(trained_run, tmp_path)
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "loss": 0.6')  # disk full during an append
    status = run_cli("status", str(run_dir))
    assert status.returncode == 0 and "dropped 1 unreadable line" in status.stderr, status.stderr[-2000:]
    assert "step 8 loss" in status.stdout
    assert metrics(run_dir)[-1]["step"] == 8  # the tests' own reader
    proc = check(run_cli("train", "--config", str(cfg), "--resume", "auto"))
    assert "dropped 1 unreadable line" in proc.stdout + proc.stderr
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert all(json.loads(x) for x in lines)  # the resume rewrote the log without it


def test_a_manifest_of_the_wrong_shape_is_damage_and_auto_falls_back(trained_run, tmp_path):
    run_dir, cfg = _copy_run(trained_run, tmp_path)
    newest = checkpoint.complete(run_dir / "checkpoints")[-1]
    (newest / "manifest.json").write_text(json.dumps({"format": checkpoint.FORMAT, "files": ["adapter"]}))
    proc = check(run_cli("train", "--config", str(cfg), "--resume", "auto"))
    out = proc.stdout + proc.stderr
    assert "skipping damaged checkpoint" in out and "not the manifest bigadapt writes" in out
    assert "resumed from" in out and "step-00000004" in out


def test_every_checkpoint_damaged_is_an_error_not_a_restart(trained_run, tmp_path):
    run_dir, cfg = _copy_run(trained_run, tmp_path)
    for ckpt in checkpoint.complete(run_dir / "checkpoints"):
        (ckpt / "optimizer.safetensors").write_bytes(b"garbage")
    history = (run_dir / "metrics.jsonl").read_text()
    proc = run_cli("train", "--config", str(cfg), "--resume", "auto")
    assert proc.returncode == EXIT_USER_ERROR
    assert "none of its 2 checkpoint(s) is intact" in _error_line(proc)
    assert (run_dir / "metrics.jsonl").read_text() == history  # nothing started over


def test_a_damaged_adapter_file_is_one_line_naming_it(trained_run, tmp_path):
    run_dir, _ = _copy_run(trained_run, tmp_path)
    newest = checkpoint.complete(run_dir / "checkpoints")[-1]
    data = (newest / "adapter.safetensors").read_bytes()
    (newest / "adapter.safetensors").write_bytes(data[: len(data) // 3])
    proc = run_cli("export", str(newest), "--format", "peft", str(tmp_path / "out"))
    assert proc.returncode == EXIT_USER_ERROR
    assert "adapter.safetensors" in _error_line(proc)


def test_garbage_in_a_checkpoint_file_that_matches_its_manifest_is_one_line(tmp_path):
    """A file written by something else and re-hashed into the manifest: safetensors' own error, named."""
    from bigadapt.errors import CheckpointError
    (tmp_path / "adapter.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="adapter.safetensors: not a readable safetensors file"):
        checkpoint.read_tensors(tmp_path, "adapter.safetensors")


def test_a_garbage_base_model_file_is_one_line_naming_it(tmp_path):
    from transformers import GPT2Config, GPT2ForSequenceClassification
    base = tmp_path / "base"
    GPT2ForSequenceClassification(GPT2Config(**{k: v for k, v in TINY_GPT2.items() if k != "model_type"})
                                  ).save_pretrained(base)
    weights = base / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    cfg = tiny_config(tmp_path / "run", train={"max_steps": 1, "track": []})
    cfg["model"] = {"name_or_path": str(base), "objective": "seq_cls", "tokenizer": None}
    proc = run_cli("train", "--config", str(write_config(tmp_path / "cfg.yaml", cfg)))
    assert proc.returncode == EXIT_USER_ERROR
    assert "model.safetensors" in _error_line(proc)


# ---------------------------------------------------------------- storage
@pytest.fixture
def small_disk(tmp_path):
    """A 2 MiB tmpfs (root only); unmounted afterwards."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2M", "tmpfs", str(mnt)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(mnt: Path, leave: int) -> Path:
    """A file that takes all but about `leave` bytes of the disk."""
    filler = mnt / "filler"
    free = shutil.disk_usage(mnt).free
    filler.write_bytes(b"\0" * max(0, free - leave))
    return filler


def test_disk_full_while_saving_is_one_line_and_keeps_the_previous_checkpoint(small_disk, tmp_path):
    run_dir = small_disk / "run"
    check(run_cli("train", "--config", str(_config(tmp_path, run_dir))))  # checkpoints at steps 2 and 4
    before = checkpoint.complete(run_dir / "checkpoints")
    filler = _fill(small_disk, leave=12 * 1024)  # room for log lines, not for a 27 KiB checkpoint
    longer = _config(tmp_path, run_dir, "longer.yaml", max_steps=6)
    proc = run_cli("train", "--config", str(longer), "--resume", "auto")
    assert proc.returncode == EXIT_USER_ERROR, proc.stderr[-3000:]
    line = _error_line(proc)
    assert "No space left on device" in line and "intact" in line
    assert checkpoint.complete(run_dir / "checkpoints") == before
    for c in before:
        checkpoint.verify(c)
    assert not list((run_dir / "checkpoints").glob(".tmp-*"))  # no half-written debris either
    filler.unlink()  # space freed: the run continues from where it was
    check(run_cli("train", "--config", str(longer), "--resume", "auto"))
    assert checkpoint.complete(run_dir / "checkpoints")[-1].name == "step-00000006"


def test_a_metrics_log_that_cannot_be_appended_to_is_one_line(tmp_path):
    """The append's failure path (a full disk gives ENOSPC there; a completely full disk is refused earlier, when
    the run directory's lock is stamped)."""
    run_dir = tmp_path / "run"
    (run_dir / "metrics.jsonl").mkdir(parents=True)  # something that is not a file where the log goes
    proc = run_cli("train", "--config", str(_config(tmp_path, run_dir, max_steps=2)))
    assert proc.returncode == EXIT_USER_ERROR
    assert "metrics.jsonl: cannot be appended to" in _error_line(proc)


def test_an_unwritable_run_dir_is_one_line(tmp_path):
    (tmp_path / "file").write_text("not a directory")
    proc = run_cli("train", "--config", str(_config(tmp_path, tmp_path / "file" / "run")))
    assert proc.returncode == EXIT_USER_ERROR
    assert "run_dir" in _error_line(proc)


def test_an_unwritable_checkpoint_folder_is_one_line(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("a file where the checkpoints go")
    proc = run_cli("train", "--config", str(_config(tmp_path, run_dir, max_steps=2)))
    assert proc.returncode == EXIT_USER_ERROR
    assert "cannot write checkpoint step-00000002" in _error_line(proc)


def test_cleanup_removes_step_leftovers_without_a_manifest(trained_run, tmp_path):
    run_dir, cfg = _copy_run(trained_run, tmp_path)
    (run_dir / "checkpoints" / "step-00000009").mkdir()  # a kill during a removal: nothing left in it
    partial = run_dir / "checkpoints" / "step-00000002"
    partial.mkdir()
    (partial / "optimizer.safetensors").write_bytes(b"half")
    check(run_cli("train", "--config", str(cfg), "--resume", "auto"))
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step-00000004", "step-00000008"]


def test_prune_never_leaves_a_step_directory_half_removed(tmp_path, monkeypatch):
    """A removal is a rename out of the step-* names first: a kill during the rmtree leaves only .old-* debris."""
    for step in (1, 2, 3):
        d = tmp_path / f"step-{step:08d}"
        d.mkdir()
        (d / "manifest.json").write_text("{}")
        (d / "adapter.safetensors").write_bytes(b"x")

    def killed(path, ignore_errors=False):
        (Path(path) / "manifest.json").unlink()  # the rmtree got this far, then the process died
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.prune(tmp_path, keep_last=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-00000002", "step-00000003"]
    monkeypatch.undo()
    checkpoint.clean_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-00000002", "step-00000003"]
