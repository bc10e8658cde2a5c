"""Real 2-rank DeepSpeed ZeRO-3 on CPU: sharding, frozen base, exact resume. Every 2-rank training run of this
module goes through one `deepspeed` launch, as the README's command does (this file runs as the ranks' script);
the merge check through torchrun (conftest.launch)."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint
from tests.conftest import (
    TINY_GPT2,
    TINY_LLAMA,
    check,
    launch,
    run_cli,
    tiny_config,
    train_each,
    train_losses,
    write_config,
)

pytestmark = pytest.mark.distributed
STEPS = 8


DEEP = dict(TINY_GPT2, n_layer=8)  # enough blocks for the gather windows to matter
WINDOWS = {"sized": {}, "deepspeed_defaults": {"prefetch_bucket_size": 50_000_000, "max_live_parameters": 10**9,
                                               "max_reuse_distance": 10**9}}


def _config(root: Path, name: str, arch=None, **sections) -> Path:
    sections.setdefault("train", {"max_steps": STEPS, "save_every": 4, "keep_last": 5, "lr": 5e-3})
    return write_config(root / f"{name}.yaml", tiny_config(root / name, **({"arch": arch} if arch else {}),
                                                           **sections))


def _interrupted(src: Path, run_dir: Path) -> None:
    """`run_dir` as a run interrupted at checkpoint `src` leaves it: that checkpoint, nothing after."""
    shutil.copytree(src, run_dir / "checkpoints" / src.name)


def _write_configs(root: Path) -> None:
    for name in ("a", "b", "c", "d", "e"):  # LoRA on GPT-2, 8 steps, checkpoints at 4 and 8
        _config(root, name)
    for name, windows in WINDOWS.items():
        _config(root, name, arch=DEEP, train={"max_steps": 5}, zero={"param_persistence_threshold": 0, **windows})
    from transformers import AutoConfig, AutoModelForCausalLM
    arch = dict(TINY_LLAMA)
    local = root / "tiny-llama"
    AutoModelForCausalLM.from_config(AutoConfig.for_model(arch.pop("model_type"), **arch)).save_pretrained(local)
    _config(root, "llama", model={"name_or_path": str(local), "arch": {}, "objective": "causal_lm", "dtype": "bf16"},
            method={"targets": ["q", "k", "v", "o"]}, data={"task": "synthetic_lm", "seq_len": 16},
            train={"max_steps": 4, "lr": 5e-3})


def main(root: Path) -> int:
    """Every 2-rank run of this module in the same two ranks, one `bigadapt train` after another (the launcher
    and imports paid once): "a" (the shared run), "b" resumed from a's step 4 on the same world size, the two
    window settings, the bf16 LLaMA, and "e" resumed from the one-process run "d"."""
    from bigadapt import zero
    from bigadapt.cli import main as cli
    rc = cli(["train", "--config", str(root / "a.yaml")])
    if zero.rank() == 0 and rc == 0:
        _interrupted(root / "a" / "checkpoints" / "step-00000004", root / "b")
        (root / "b.ready").touch()
    while rc == 0 and not (root / "b.ready").exists():  # the other rank waits for rank 0's copy
        time.sleep(0.1)
    return (rc or cli(["train", "--config", str(root / "b.yaml"), "--resume", "auto"])
            or train_each(root / f"{name}.yaml" for name in (*WINDOWS, "llama"))
            or cli(["train", "--config", str(root / "e.yaml"), "--resume", "auto"]))


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    """One process trains "d" (stage 0); one 2-rank launch, through the `deepspeed` launcher as the README's
    command, trains every 2-rank run (main); one process resumes a's step 4 as "c"."""
    root = tmp_path_factory.mktemp("z3")
    _write_configs(root)
    check(run_cli("train", "--config", str(root / "d.yaml")))
    _interrupted(root / "d" / "checkpoints" / "step-00000004", root / "e")
    check(launch(2, str(root), script="tests/distributed/test_zero3.py", launcher="deepspeed", timeout=900))
    _interrupted(root / "a" / "checkpoints" / "step-00000004", root / "c")
    check(run_cli("train", "--config", str(root / "c.yaml"), "--resume", "auto"))
    return root


@pytest.fixture(scope="module")
def two_rank_run(runs) -> Path:
    return runs / "a"


def test_each_rank_holds_half_of_the_frozen_base(two_rank_run):
    layout = json.loads((two_rank_run / "layout.json").read_text())
    total, ranks = layout["base_numel_total"], layout["ranks"]
    assert layout["world_size"] == 2 and len(ranks) == 2
    n_tensors = 60  # partition padding is at most one element per tensor
    for r in ranks:
        assert abs(r["base_numel"] - total / 2) <= n_tensors, r
        # optimizer state: two Adam moments for this rank's slice of the trainable parameters only
        assert r["master_numel"] == r["optimizer_state_numel"] / 2
        assert abs(r["master_numel"] - layout["trainable_numel_total"] / 2) <= n_tensors
        assert r["optimizer_state_numel"] < r["base_numel"] / 10


def assert_accounting_matches(run_dir: Path) -> None:
    """The memory predicted before the run matches what DeepSpeed held, on every rank, within 2%."""
    report = json.loads((run_dir / "accounting.json").read_text())
    assert report["model_states_max_rel_error"] <= 0.02, report
    assert len(report["measured"]) == json.loads((run_dir / "layout.json").read_text())["world_size"]
    bound = report["predicted"]["zero3_gather_buffers"]  # ZeRO-3 only: the gather windows' working set
    for measured in report["measured"] if bound else []:
        assert 0 < measured["zero3_gather_buffers"] <= bound, report


def test_memory_prediction_matches_measurement(two_rank_run, tmp_path):
    assert_accounting_matches(two_rank_run)


def test_no_rank_holds_the_whole_base_while_training(runs):
    """In steady state (after DeepSpeed has traced the step) each rank's gathered base stays within the
    windows sized from the model; DeepSpeed's own windows would keep nearly all of it gathered. The windows
    change what is held, never what is computed."""
    held, losses = {}, {}
    for name in WINDOWS:
        run_dir = runs / name
        whole = json.loads((run_dir / "layout.json").read_text())["base_numel_total"] * 4  # fp32
        report = json.loads((run_dir / "accounting.json").read_text())
        held[name] = max(m["zero3_gather_buffers"] for m in report["measured"]) / whole
        assert held[name] * whole <= report["predicted"]["zero3_gather_buffers"]
        losses[name] = train_losses(run_dir)
    assert held["sized"] < 0.35 and held["deepspeed_defaults"] > 0.9, held
    assert losses["sized"] == losses["deepspeed_defaults"] and len(losses["sized"]) == 5


def test_adapter_file_holds_only_trainable_tensors_at_full_shape(two_rank_run):
    ckpt = checkpoint.complete(two_rank_run / "checkpoints")[-1]
    tensors = load_file(ckpt / "adapter.safetensors")
    assert all("lora_" in n or n.startswith("score.") for n in tensors)
    assert tensors["transformer.h.1.attn.c_attn.lora_A"].shape == (8, 64)  # full, not a partition
    assert tensors["transformer.h.1.attn.c_attn.lora_B"].shape == (128, 4)
    assert checkpoint.verify(ckpt)["world_size_at_save"] == 2


def test_resume_on_the_same_world_size_is_bitwise(two_rank_run, runs):
    resumed = runs / "b"
    ref, got = train_losses(two_rank_run), train_losses(resumed)
    assert [got[s] for s in range(5, STEPS + 1)] == [ref[s] for s in range(5, STEPS + 1)]
    _assert_same_adapter(two_rank_run, resumed, exact=True)


def test_resume_two_ranks_to_one(two_rank_run, runs):
    resumed = runs / "c"
    _assert_same_losses(two_rank_run, resumed)
    _assert_same_adapter(two_rank_run, resumed, exact=False)


def test_resume_one_rank_to_two(runs):
    single, resumed = runs / "d", runs / "e"
    assert_accounting_matches(single)  # stage 0, one rank
    _assert_same_losses(single, resumed)
    _assert_same_adapter(single, resumed, exact=False)


def test_llama_from_a_local_directory_in_bf16_on_two_ranks(runs):
    """from_pretrained of real files under ZeRO-3: each rank keeps half, in bf16; LoRA masters stay fp32."""
    run = runs / "llama"
    layout = json.loads((run / "layout.json").read_text())
    for r in layout["ranks"]:
        assert abs(r["base_numel"] - layout["base_numel_total"] / 2) <= 60
        assert r["base_bytes"] == 2 * r["base_numel"]  # bf16 partitions
    ckpt = checkpoint.complete(run / "checkpoints")[-1]
    tensors = load_file(ckpt / "adapter.safetensors")
    assert tensors["model.layers.0.self_attn.k_proj.lora_B"].shape == (32, 4)  # GQA: 2 kv heads x 16
    assert all(t.dtype == torch.float32 for t in tensors.values())
    assert all("lora_" in n for n in tensors)  # causal LM: no head
    assert checkpoint.verify(ckpt)["base"]["dtype"] == "bfloat16"
    assert_accounting_matches(run)  # bf16 partitions, bf16 working copies, fp32 masters
    assert all(torch.isfinite(torch.tensor(v)) for v in train_losses(run).values())


def test_merge_under_zero3_one_module_at_a_time(tmp_path):
    out = tmp_path / "merge.json"
    check(launch(2, str(out), script="tests/distributed/merge_check.py"))
    diffs = json.loads(out.read_text())
    assert diffs["delta_visible"] > 1e-3  # the adapter changes the output...
    assert diffs["merged_vs_unmerged"] < 1e-5  # ...merged gives the same output...
    assert diffs["unmerged_vs_before"] < 1e-5  # ...and unmerging restores the model


def _assert_same_losses(ref_dir: Path, got_dir: Path) -> None:
    ref, got = train_losses(ref_dir), train_losses(got_dir)
    for s in range(5, STEPS + 1):  # different reduction order across world sizes: equal to float rounding
        assert got[s] == pytest.approx(ref[s], rel=1e-5), (s, got[s], ref[s])


def _assert_same_adapter(a: Path, b: Path, exact: bool) -> None:
    ta = load_file(checkpoint.complete(a / "checkpoints")[-1] / "adapter.safetensors")
    tb = load_file(checkpoint.complete(b / "checkpoints")[-1] / "adapter.safetensors")
    assert ta.keys() == tb.keys()
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:
            torch.testing.assert_close(tb[k], ta[k], rtol=1e-4, atol=1e-6)



if __name__ == "__main__":
    sys.exit(main(Path(sys.argv[-1])))
