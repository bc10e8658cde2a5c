"""--resume auto refuses a change of one hyperparameter that changes the math (issue 21: a changed train.lr alone was
accepted, and the manifest re-stamped with it), names it with its fix, and lets the keys that only change where and
when things are written through. In process: the CLI path is tests/test_run_ownership.py."""
from __future__ import annotations

from pathlib import Path

import pytest

from bigadapt.config import config_from_dict
from bigadapt.errors import ConfigError
from bigadapt.rundir import check_resume_config

from .conftest import tiny_config


def _manifest(**train) -> dict:
    return {"config": config_from_dict(tiny_config(Path("run"), train=train)).to_dict()}


def test_a_changed_lr_alone_is_refused_unless_allowed():
    resumed = config_from_dict(tiny_config(Path("run"), train={"lr": 1e-3}))
    with pytest.raises(ConfigError, match=r"train.lr \(0.002 -> 0.001\).*--allow-config-change train.lr$"):
        check_resume_config(Path("ckpt"), _manifest(lr=2e-3), resumed, [])
    assert check_resume_config(Path("ckpt"), _manifest(lr=2e-3), resumed, ["train.lr"]) == {
        "train.lr": (2e-3, 1e-3)}


def test_keys_that_do_not_change_a_step_pass():
    resumed = config_from_dict(tiny_config(Path("run"), train={"max_steps": 16, "log_every": 2}))
    assert set(check_resume_config(Path("ckpt"), _manifest(), resumed, [])) == {"train.max_steps", "train.log_every"}
