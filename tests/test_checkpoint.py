"""Checkpoints on disk: only trainable tensors, atomic under SIGKILL, damage detected, wrong base refused."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint, methods, targets
from bigadapt.config import config_from_dict
from bigadapt.errors import CheckpointError
from bigadapt.fingerprint import fingerprint
from bigadapt.model import build_base

from .conftest import REPO, check, env, metrics, run_cli, tiny_config, write_config


def test_only_trainable_tensors_at_full_shape(trained_run):
    ckpts = checkpoint.complete(trained_run / "checkpoints")
    assert [c.name for c in ckpts] == ["step-00000004", "step-00000008"]
    manifest = checkpoint.verify(ckpts[-1])
    tensors = load_file(ckpts[-1] / "adapter.safetensors")
    assert set(tensors) == set(manifest["tensors"])
    assert all("lora_" in n or n.startswith("score.") for n in tensors)
    d, r = 64, 4  # tiny GPT-2: c_attn LoRA on q and v -> A [2r, d], B [2d, r]
    assert tensors["transformer.h.0.attn.c_attn.lora_A"].shape == (2 * r, d)
    assert tensors["transformer.h.0.attn.c_attn.lora_B"].shape == (2 * d, r)
    assert all(t.dtype == torch.float32 for t in tensors.values())
    moments = load_file(ckpts[-1] / "optimizer.safetensors")
    assert set(moments) == {f"{n}.{k}" for n in tensors for k in ("exp_avg", "exp_avg_sq")}
    assert sum(t.numel() for t in tensors.values()) < manifest["base"]["num_params"] / 40  # tiny base: ~50x


def _copy(ckpt, tmp_path):
    dst = tmp_path / "checkpoints" / ckpt.name
    shutil.copytree(ckpt, dst)
    return dst


def test_truncated_and_corrupted_files_are_detected(trained_run, tmp_path):
    ckpt = _copy(checkpoint.complete(trained_run / "checkpoints")[-1], tmp_path)
    f = ckpt / "adapter.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="adapter.safetensors: truncated"):
        checkpoint.verify(ckpt)
    f.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))
    with pytest.raises(CheckpointError, match="adapter.safetensors: corrupted"):
        checkpoint.verify(ckpt)


def test_resume_auto_skips_a_damaged_newest_checkpoint(trained_run, tmp_path):
    old, new = (_copy(c, tmp_path) for c in checkpoint.complete(trained_run / "checkpoints"))
    (new / "optimizer.safetensors").write_bytes(b"garbage")
    said = []
    assert checkpoint.find_resume(tmp_path / "checkpoints", "auto", log=said.append) == old
    assert "optimizer.safetensors" in said[0]


def _model(cfg_dict, seed):
    cfg = config_from_dict(cfg_dict)
    model = build_base(cfg.model, seed)
    fp = fingerprint(model, exclude=targets.head_prefixes(model))
    methods.apply(model, cfg)
    return model, fp, cfg


def test_another_base_is_refused(trained_run):
    ckpt = checkpoint.complete(trained_run / "checkpoints")[-1]
    saved = json.loads((ckpt / "manifest.json").read_text())["config"]
    model, fp, _ = _model(saved, seed=saved["train"]["seed"] + 1)  # same shapes, other weights
    with pytest.raises(CheckpointError, match="another base \\(base weights differ"):
        checkpoint.load_adapter(ckpt, model, fp)
    model, fp, _ = _model(dict(saved, method=dict(saved["method"], r=8)), seed=saved["train"]["seed"])
    with pytest.raises(CheckpointError, match="has shape"):
        checkpoint.load_adapter(ckpt, model, fp)
    model, fp, _ = _model(saved, seed=saved["train"]["seed"])
    checkpoint.load_adapter(ckpt, model, fp)  # the right base loads


def test_sigkill_during_a_save_leaves_the_previous_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(run_dir, train={"max_steps": 6, "save_every": 2,
                                                                        "keep_last": 5}))
    proc = subprocess.Popen([sys.executable, "-m", "bigadapt", "train", "--config", str(cfg)], cwd=REPO,
                            env=dict(env(), BIGADAPT_FAULT_SAVE_DELAY="2"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    ckpts = run_dir / "checkpoints"
    deadline = time.time() + 240
    while not list(ckpts.glob(".tmp-step-00000004-*/adapter.safetensors")) and time.time() < deadline:
        assert proc.poll() is None, "training ended before the save could be interrupted"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert [c.name for c in checkpoint.complete(ckpts)] == ["step-00000002"]
    checkpoint.verify(ckpts / "step-00000002")
    check(run_cli("train", "--config", str(cfg), "--resume", "auto"))  # picks up from step 2, cleans the debris
    assert [c.name for c in checkpoint.complete(ckpts)][-1] == "step-00000006"
    assert not list(ckpts.glob(".tmp-*"))
    steps = [m["step"] for m in metrics(run_dir) if "loss" in m]
    assert steps == sorted(set(steps)) and steps[-1] == 6  # no duplicated records after the resume


def test_signal_checkpoints_at_a_step_boundary_and_exits_3(tmp_path):
    run_dir = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", tiny_config(run_dir, train={"max_steps": 100000}))
    proc = subprocess.Popen([sys.executable, "-m", "bigadapt", "train", "--config", str(cfg)], cwd=REPO, env=env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.time() + 240
    while not (run_dir / "metrics.jsonl").exists() and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGUSR1)
    proc.send_signal(signal.SIGTERM)  # a second signal during the stop changes nothing
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 3, out[-3000:]
    (ckpt,) = checkpoint.complete(run_dir / "checkpoints")
    state = json.loads((ckpt / "state.json").read_text())
    assert state["step"] == int(ckpt.name.split("-")[1]) >= 1
    assert "stop requested" in out


def test_keep_last_prunes_only_older_complete_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step in (2, 4, 6, 8):
        (root / f"step-{step:08d}").mkdir(parents=True)
        (root / f"step-{step:08d}" / "manifest.json").write_text("{}")
    (root / "step-00000010").mkdir()  # no manifest: a save in progress, not a checkpoint
    checkpoint.prune(root, keep_last=2)
    assert sorted(d.name for d in root.iterdir()) == ["step-00000006", "step-00000008", "step-00000010"]


def test_causal_lm_objective_trains_and_evaluates(tmp_path):
    run_dir = tmp_path / "lm"
    cfg = write_config(tmp_path / "lm.yaml", tiny_config(run_dir, model={"objective": "causal_lm"},
                                                         data={"task": "synthetic_lm", "seq_len": 16},
                                                         train={"max_steps": 4}))
    check(run_cli("train", "--config", str(cfg)))
    final = [m for m in metrics(run_dir) if m.get("split") == "eval"][-1]
    assert 0.0 <= final["accuracy"] <= 1.0 and final["eval_loss"] > 0  # next-token accuracy on the copy half
    tensors = load_file(checkpoint.complete(run_dir / "checkpoints")[-1] / "adapter.safetensors")
    assert all("lora_" in n for n in tensors)
