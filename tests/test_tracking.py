"""Experiment tracking: TensorBoard event files (read back) and W&B (offline), copies of metrics.jsonl."""
from __future__ import annotations

import sys

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

from bigadapt.config import load_config
from bigadapt.errors import ConfigError
from bigadapt.tracking import Trackers, scalars

from .conftest import check, metrics, run_cli, tiny_config, write_config


def _curves(run_dir) -> dict[str, list[tuple[int, float]]]:
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def _from_metrics(run_dir, key: str, split: str = "train") -> list[tuple[int, float]]:
    return [(m["step"], pytest.approx(m[key], rel=1e-6)) for m in metrics(run_dir)
            if m.get("split", "train") == split and key in m]


def _session_starts(path) -> list[int]:
    """Steps of the SessionLog START events in one event file: where TensorBoard purges from (purge_step)."""
    return [e.step for e in EventFileLoader(str(path)).Load() if e.HasField("session_log")]


def test_tensorboard_mirrors_metrics_and_a_resume_continues_the_curves(tmp_path):
    run_dir = tmp_path / "run"
    train = {"max_steps": 8, "save_every": 4, "eval_every": 4, "keep_last": 3, "log_every": 1}
    cfg = write_config(tmp_path / "a.yaml", tiny_config(run_dir, train=train))
    check(run_cli("train", "--config", str(cfg)))
    curves = _curves(run_dir)
    for key in ("loss", "lr", "tokens_per_s", "step_s", "mem_mb", "train_s", "samples"):
        assert curves[f"train/{key}"] == _from_metrics(run_dir, key), key
    assert [s for s, _ in curves["train/loss"]] == list(range(1, 9))
    for key in ("eval_loss", "accuracy"):
        assert curves[f"eval/{key}"] == _from_metrics(run_dir, key, "eval") and len(curves[f"eval/{key}"]) == 2

    # the run as if it had been interrupted after writing steps 5..8: resume from step 4 redoes them
    check(run_cli("train", "--config", str(cfg), "--resume", str(run_dir / "checkpoints" / "step-00000004")))
    files = sorted((run_dir / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2 and _session_starts(files[1]) == [5]  # the second run hides what it redoes
    curves = _curves(run_dir)
    assert [s for s, _ in curves["train/loss"]] == list(range(1, 9))  # one point per step, no duplicated tail
    assert curves["train/loss"] == _from_metrics(run_dir, "loss")
    assert [s for s, _ in curves["eval/eval_loss"]] == [4, 8]


def test_records_become_train_and_eval_scalars():
    assert scalars({"step": 3, "loss": 0.5, "lr": 1e-3, "samples": 48}) == (
        3, {"train/loss": 0.5, "train/lr": 1e-3, "train/samples": 48.0})
    assert scalars({"step": 4, "split": "eval", "eval_loss": 0.25, "accuracy": 1, "flag": True, "note": "x"}) == (
        4, {"eval/eval_loss": 0.25, "eval/accuracy": 1.0})


def test_only_rank_0_tracks_and_none_asked_writes_nothing(tmp_path):
    for trackers in (Trackers(["tensorboard"], tmp_path, 0, {}, rank=1), Trackers([], tmp_path, 0, {})):
        trackers.log({"step": 1, "loss": 1.0})
        trackers.close()
    assert not any(tmp_path.iterdir())


def test_tensorboard_is_the_default_and_track_can_be_emptied():
    assert load_config(None).train.track == ["tensorboard"]
    assert load_config(None, ["train.track=[]"]).train.track == []


def test_unknown_tracker_is_one_line():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.track=[mlflow]"])
    assert "unknown tracker 'mlflow'" in str(e.value) and "\n" not in str(e.value)


def test_wandb_missing_names_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # what an environment without wandb looks like to find_spec
    with pytest.raises(ConfigError) as e:
        load_config(None, ["train.track=[wandb]"])
    assert "pip install 'bigadapt[wandb]'" in str(e.value) and "\n" not in str(e.value)


def test_wandb_offline_run_is_continued_by_a_resume(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the optional extra bigadapt[wandb] is not installed")
    monkeypatch.setenv("WANDB_MODE", "offline")  # run_cli passes this process's environment on
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_dir = tmp_path / "run"
    train = {"max_steps": 4, "save_every": 2, "log_every": 1, "track": ["tensorboard", "wandb"]}
    cfg = write_config(tmp_path / "a.yaml", tiny_config(run_dir, train=train))
    check(run_cli("train", "--config", str(cfg), "--set", "train.max_steps=2"))
    run_id = (run_dir / "wandb_id.txt").read_text().strip()
    check(run_cli("train", "--config", str(cfg), "--resume", "auto"))
    # both processes wrote to the one W&B run (offline: one local directory per process, the same run id)
    offline = sorted(p.name for p in (run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(name.endswith(f"-{run_id}") for name in offline)
    assert [s for s, _ in _curves(run_dir)["train/loss"]] == [1, 2, 3, 4]  # both trackers at once
