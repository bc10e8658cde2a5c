"""Multi-node without SLURM, as documented in docs/slurm.md: two "nodes" on one host, one launch each."""
from __future__ import annotations

import json
import os
import subprocess

import pytest

from ..conftest import BIN, REPO, env, tiny_config, write_config

pytestmark = pytest.mark.distributed


def _both(cmds: list[list[str]]) -> None:
    procs = [subprocess.Popen(c, cwd=REPO, env=env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for c in cmds]
    outs = [p.communicate(timeout=300)[0] for p in procs]
    for p, out in zip(procs, outs):
        assert p.returncode == 0, out[-4000:]


def _check(run_dir) -> None:
    layout = json.loads((run_dir / "layout.json").read_text())
    assert layout["world_size"] == 2
    assert all(abs(r["base_numel"] - layout["base_numel_total"] / 2) <= 60 for r in layout["ranks"])


def test_torchrun_two_nodes(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", train={"max_steps": 3}))
    port = str(31000 + os.getpid() % 1000)
    _both([[str(BIN / "torchrun"), "--nnodes", "2", "--node_rank", str(n), "--nproc_per_node", "1",
            "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py", "--config", str(cfg)]
           for n in (0, 1)])
    _check(tmp_path / "run")


def test_deepspeed_hostfile_no_ssh_two_nodes(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", train={"max_steps": 3}))
    hostfile = tmp_path / "hostfile"
    hostfile.write_text("node0 slots=1\nnode1 slots=1\n")
    port = str(32000 + os.getpid() % 1000)
    _both([[str(BIN / "deepspeed"), "--hostfile", str(hostfile), "--no_ssh", "--node_rank", str(n),
            "--master_addr", "127.0.0.1", "--master_port", port, "launch/train.py", "--config", str(cfg)]
           for n in (0, 1)])
    _check(tmp_path / "run")
