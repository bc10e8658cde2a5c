"""QLoRA under DeepSpeed ZeRO-3 on 2 CPU ranks: the same losses as one process at stage 0."""
from __future__ import annotations

import pytest

from tests.conftest import check, launch, run_cli, tiny_config, train_losses, write_config


@pytest.mark.parametrize("quantization", ["nf4"])
def test_qlora_zero3_two_ranks_matches_one_process(tmp_path, quantization):
    runs = {}
    for name, stage in (("zero3", 3), ("single", 0)):
        run_dir = tmp_path / name
        cfg = write_config(tmp_path / f"{name}.yaml", tiny_config(
            run_dir, model={"quantization": quantization}, method={"name": "qlora"},
            zero={"stage": stage, "param_persistence_threshold": 0}))
        check(launch(2, "--config", str(cfg), extra_env={"OMP_NUM_THREADS": "1"}) if stage == 3
              else run_cli("train", "--config", str(cfg)))
        runs[name] = train_losses(run_dir)
    assert runs["zero3"].keys() == runs["single"].keys()
    for step, loss in runs["single"].items():
        assert abs(runs["zero3"][step] - loss) < 1e-4, step
