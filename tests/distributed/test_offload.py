"""Offload on 2 real ranks (DeepSpeed's CPU accelerator, ZeRO-3, torch AdamW as the client optimizer): the
same losses as without offload, and the model states the estimate predicted, measured."""
from __future__ import annotations

import json

import pytest

from ..conftest import check, launch_each, run_cli, tiny_config, train_losses, write_config

pytestmark = pytest.mark.distributed


def test_offload_trains_like_no_offload(tmp_path):
    """On CPU the 'host' is the accelerator, so offload moves nothing physically; what is tested is that
    DeepSpeed's offload code paths (fp32 partitions and their gradients in host buffers, parameter partitions
    offloaded) run with bigadapt's AdamW and give bit-equal losses, and that the extra host gradient buffer
    optimizer offload keeps is predicted exactly."""
    losses, reports, configs = {}, {}, []
    variants = {"none": {}, "optimizer": {"offload_optimizer": "cpu"},
                "both": {"offload_optimizer": "cpu", "offload_param": "cpu"}}
    for name, offload in variants.items():
        configs.append(write_config(tmp_path / f"{name}.yaml", tiny_config(tmp_path / name, train={"max_steps": 4},
                                    zero={"stage": 3, "param_persistence_threshold": 0, **offload})))
    check(launch_each(2, configs, extra_env={"OMP_NUM_THREADS": "1"}))  # the three runs in the same two ranks
    for name in variants:
        run_dir = tmp_path / name
        losses[name] = train_losses(run_dir)
        reports[name] = json.loads((run_dir / "accounting.json").read_text())
    assert len(losses["none"]) == 4 and losses["optimizer"] == losses["none"] == losses["both"]
    for name, report in reports.items():
        assert report["model_states_max_rel_error"] <= 0.02, (name, report)
    opt = reports["optimizer"]["predicted"]
    assert opt["offload_host_ram"] == opt["fp32_masters"] + opt["optimizer_states"] + opt["gradients"] > 0
    both = reports["both"]["predicted"]
    assert both["offload_host_ram"] == opt["offload_host_ram"] + both["base_partition"] + both["trainable_working"]


def test_param_offload_below_stage_3_refused_before_any_rank_starts(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", zero={"stage": 2, "offload_param": "cpu"}))
    proc = run_cli("train", "--config", str(cfg))
    assert proc.returncode == 2
    line = proc.stderr.strip().splitlines()[-1]
    assert "zero.offload_param" in line and "stage 3" in line and not (tmp_path / "run").exists()


def test_nvme_without_libaio_or_path_refused(tmp_path):
    from bigadapt.engine import _aio_available
    sets = {"stage": 3, "offload_optimizer": "nvme"}
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", zero=sets))
    proc = run_cli("train", "--config", str(cfg))
    assert proc.returncode == 2 and "zero.nvme_path" in proc.stderr.strip().splitlines()[-1]
    if _aio_available():
        pytest.skip("libaio is installed here: nvme offload is not refused for lack of it")
    cfg = write_config(tmp_path / "d.yaml", tiny_config(tmp_path / "run", zero=dict(sets, nvme_path=str(tmp_path))))
    proc = run_cli("train", "--config", str(cfg))
    assert proc.returncode == 2 and "libaio" in proc.stderr.strip().splitlines()[-1], proc.stderr[-2000:]
