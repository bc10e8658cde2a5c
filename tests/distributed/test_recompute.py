"""Activation checkpointing on a ZeRO-3-sharded frozen base, 2 ranks through the deepspeed launcher.

One launch runs this file as a script: every case trains in turn in the same two processes (`bigadapt train`,
max_steps 3). Each checkpointed case must give the losses of its run without checkpointing (fp32, CPU: 1e-6
relative), for LoRA, AdapterH and PreLayer (whose per-layer tables are written by a post-hook on the very blocks
that are checkpointed), in torch's reentrant and non-reentrant forms (the latter is what crashed on DeepSpeed
before PR 8148: "saved shape [n] vs recomputed [0]"), with nonzero dropout (the recompute must replay the
forward's masks) and with every 2nd block only.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from tests.conftest import TINY_GPT2, check, launch, tiny_config, train_each, train_losses, write_config

pytestmark = pytest.mark.distributed

DROPOUT = {"resid_pdrop": 0.1, "embd_pdrop": 0.1, "attn_pdrop": 0.1}
# group -> (arch changes, method section)
GROUPS = {
    "lora": ({}, {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}),
    "adapter_h": ({}, {"name": "adapter_h", "r": 4}),
    "pre_layer": ({}, {"name": "pre_layer", "l_p": 2, "l_i": 1}),
    "dropout": (DROPOUT, {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"], "dropout": 0.1}),
    "every2": ({"n_layer": 3}, {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}),
}
# variant -> train keys; "off" is each group's reference
VARIANTS = {
    "off": {},
    "nonreentrant": {"activation_checkpointing": True, "checkpoint_reentrant": False},
    "reentrant": {"activation_checkpointing": True, "checkpoint_reentrant": True},
}
CASES = {f"{g}-{v}": (g, VARIANTS[v]) for g in ("lora", "adapter_h", "pre_layer", "dropout") for v in VARIANTS}
CASES["every2-off"] = ("every2", {})
CASES["every2-auto"] = ("every2", {"activation_checkpointing": True, "checkpoint_every": 2})  # reentrant: null


def case_config(root: Path, case: str) -> Path:
    group, train = CASES[case]
    arch, method = GROUPS[group]
    cfg = tiny_config(root / case, arch=dict(TINY_GPT2, **arch), method=method, data={"num_eval": 32},
                      train=dict({"max_steps": 3, "lr": 5e-3}, **train),
                      zero={"stage": 3, "param_persistence_threshold": 0})
    return write_config(root / f"{case}.yaml", cfg)


def main(root: Path) -> int:
    """Under the launcher: every case in these same ranks (configs written before the launch)."""
    return train_each(root / f"{case}.yaml" for case in CASES)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("recompute")
    for case in CASES:
        case_config(root, case)
    proc = check(launch(2, str(root), script="tests/distributed/test_recompute.py", timeout=900))
    return root, proc.stdout + proc.stderr


@pytest.mark.parametrize("case", [c for c in CASES if not c.endswith("-off")])
def test_losses_equal_without_checkpointing(runs, case):
    root, _ = runs
    group = CASES[case][0]
    ref, got = train_losses(root / f"{group}-off"), train_losses(root / case)
    assert len(ref) == 3 and ref.keys() == got.keys()
    for step in ref:
        assert got[step] == pytest.approx(ref[step], rel=1e-6), (case, step, ref, got)


def test_the_run_says_what_it_checkpoints(runs):
    _, out = runs
    assert "activation checkpointing: every 1 block(s), reentrant" in out
    assert "activation checkpointing: every 1 block(s), non-reentrant" in out
    # automatic on this DeepSpeed: the non-reentrant form (it has the frozen-parameter recompute fix)
    assert "activation checkpointing: every 2 block(s), non-reentrant" in out


def test_prediction_assumes_the_runs_checkpointing(runs):
    """estimate.json (the prediction the run's report compares against) models the run's own checkpointing."""
    import json
    root, _ = runs
    on = json.loads((root / "lora-reentrant" / "estimate.json").read_text())
    off = json.loads((root / "lora-off" / "estimate.json").read_text())
    assert on["layout"]["activation_checkpointing"] and not off["layout"]["activation_checkpointing"]
    assert on["per_rank"]["activations"] < off["per_rank"]["activations"]


if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[-1])))
