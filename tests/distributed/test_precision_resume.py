"""Mixed precision at every ZeRO stage through the real CLI and launcher: save, resume exactly on the same world
size, resume on another world size.

bf16 at stage 0 is DeepSpeed's FP16_UnfusedOptimizer: Adam's state and the fp32 masters sit on separate fp32
copies of the parameters, and saving used to fail with KeyError: 'exp_avg'. fp16 takes the same wrapper at stage 0
plus a dynamic loss scaler, whose state a checkpoint carries. DeepSpeed's CPU accelerator reports fp16 unsupported
(its check asks oneDNN for fp16 kernels) but torch computes half matmuls on any CPU, and DeepSpeed's real fp16 paths
(FP16_UnfusedOptimizer and its loss scaler at stage 0, ZeRO 1/2/3 with fp16) run once the accelerator says yes:
this file's processes say so (main below). fp16 on CPU is not a bigadapt feature; this only lets CPU CI cover it.

Every run goes through three processes, this file as a script, each training its configs one after another:
`first` (one process: the uninterrupted references), `two` (one 2-rank launch: the 2-rank references, then the
continuations of 1-rank checkpoints), `resume` (one process: the same-world-size continuations and those of
2-rank checkpoints). A continuation is a run directory holding only the step-SAVED checkpoint of the run it
continues, resumed with --resume auto.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint
from tests.conftest import REPO, check, env, launch, run_cli, tiny_config, train_each, train_losses, write_config

pytestmark = pytest.mark.distributed
STEPS, SAVED = 4, 2
# fp32 at stage 1 stands for 1 and 2: the same path (moments linked to DeepSpeed's flat partition before a step)
SAME = [("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3), ("fp32", 1),
        ("fp16", 0), ("fp16", 1), ("fp16", 2), ("fp16", 3)]
# the two optimizer layouts: fp32 copies (stage 0) and ZeRO-3 partitions; fp16 adds its loss scale
CROSS = [("bf16", 0), ("bf16", 3), ("fp16", 3)]
# run -> (ranks, the run whose step-SAVED checkpoint it continues)
RUNS = {"1": (1, None), "2": (2, None), "1to1": (1, "1"), "1to2": (2, "1"), "2to1": (1, "2")}
PARTS = {"first": [("1", SAME)], "two": [("2", CROSS), ("1to2", CROSS)], "resume": [("1to1", SAME), ("2to1", CROSS)]}
# fp16's scale starts high and moves within the first steps (overflows halve it at once, 2 clean steps double it),
# so the checkpoint's scale is not the initial one and a resume that lost it would scale other steps than the
# uninterrupted run
FP16 = {"fp16": {"initial_scale_power": 20, "loss_scale_window": 2, "hysteresis": 1, "min_loss_scale": 1}}


def _name(dtype: str, stage: int, run: str) -> str:
    return f"{dtype}-{stage}-{run}"


def _config(root: Path, dtype: str, stage: int, run: str) -> None:
    run_dir = root / _name(dtype, stage, run)
    cfg = tiny_config(run_dir, model={"arch": tiny_config(run_dir)["model"]["arch"], "objective": "seq_cls",
                                      "dtype": dtype},
                      train={"max_steps": STEPS, "save_every": SAVED, "keep_last": 5, "lr": 5e-3},
                      zero={"stage": stage, "param_persistence_threshold": 0,
                            **({"deepspeed_config": str(root / "fp16.json")} if dtype == "fp16" else {})})
    write_config(root / f"{_name(dtype, stage, run)}.yaml", cfg)


def main(part: str, root: Path) -> int:
    """Every run of `part`, in these processes (one, or each of 2 ranks under the launcher)."""
    from deepspeed.accelerator import get_accelerator

    from bigadapt.cli import main as cli
    get_accelerator().is_fp16_supported = lambda: True  # this test's processes only (see the module doc)
    rc = 0
    for run, cases in PARTS[part]:
        paths = [root / f"{_name(d, s, run)}.yaml" for d, s in cases]
        if RUNS[run][1] is None:
            rc = rc or train_each(paths)
        for path in paths if RUNS[run][1] else ():
            rc = rc or cli(["train", "--config", str(path), "--resume", "auto"])
    return rc


def _interrupt(root: Path, run: str) -> None:
    for part_run, cases in (r for p in PARTS.values() for r in p):
        for dtype, stage in cases if part_run == run else ():
            ckpt = _saved(root / _name(dtype, stage, RUNS[run][1]), SAVED)
            shutil.copytree(ckpt, root / _name(dtype, stage, run) / "checkpoints" / ckpt.name)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("precision")
    (root / "fp16.json").write_text(json.dumps(FP16))
    for run, cases in (r for p in PARTS.values() for r in p):
        for dtype, stage in cases:
            _config(root, dtype, stage, run)
    one = [sys.executable, __file__, "first", str(root)]
    check(subprocess.run(one, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600))
    _interrupt(root, "1to2")
    check(launch(2, "two", str(root), script="tests/distributed/test_precision_resume.py", timeout=600))
    _interrupt(root, "1to1")
    _interrupt(root, "2to1")
    one[2] = "resume"
    check(subprocess.run(one, cwd=REPO, env=env(), capture_output=True, text=True, timeout=600))
    return root


def _saved(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    last = _saved(run_dir, STEPS)
    return {**load_file(last / "adapter.safetensors"), **load_file(last / "optimizer.safetensors")}


def _state(run_dir: Path, step: int) -> dict:
    return json.loads((_saved(run_dir, step) / "state.json").read_text())


@pytest.mark.parametrize("dtype,stage", SAME)
def test_resume_on_one_rank_is_bitwise(runs, dtype, stage):
    ref, resumed = runs / _name(dtype, stage, "1"), runs / _name(dtype, stage, "1to1")
    manifest = checkpoint.verify(_saved(ref, SAVED))
    assert all(t["dtype"] == "float32" for t in manifest["tensors"].values())  # fp32 masters, whatever the base
    assert sorted(train_losses(resumed)) == list(range(SAVED + 1, STEPS + 1))  # continued, not restarted
    assert train_losses(resumed) == {s: v for s, v in train_losses(ref).items() if s > SAVED}
    want, got = _tensors(ref), _tensors(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]
    if dtype == "fp16":  # the scale moved (before the save, or after it on the restored count of clean steps),
        # and the continuation moved it as the reference did
        scales = [2.0 ** FP16["fp16"]["initial_scale_power"]] + [_state(ref, s)["loss_scale"]["cur_scale"]
                                                                 for s in (SAVED, STEPS)]
        assert len(set(scales)) > 1, scales
        for key in ("loss_scale", "skipped_steps", "optimizer_step"):
            assert _state(resumed, STEPS)[key] == _state(ref, STEPS)[key], key


@pytest.mark.parametrize("dtype,stage", CROSS)
@pytest.mark.parametrize("run", ["2to1", "1to2"])
def test_resume_on_another_world_size(runs, dtype, stage, run):
    resumed = runs / _name(dtype, stage, run)
    assert checkpoint.verify(_saved(resumed, STEPS))["world_size_at_save"] == RUNS[run][0]
    _assert_close(runs / _name(dtype, stage, RUNS[run][1]), resumed)


def _assert_close(ref: Path, got: Path) -> None:
    """Another world size sums the same numbers in another order, and 16-bit working weights and gradients round
    that difference up: equal to 16-bit precision, not bitwise."""
    want, have = train_losses(ref), train_losses(got)
    assert sorted(have) == list(range(SAVED + 1, STEPS + 1))
    for s in have:
        assert have[s] == pytest.approx(want[s], rel=2e-2), (s, have[s], want[s])
    a, b = load_file(_saved(ref, STEPS) / "adapter.safetensors"), load_file(_saved(got, STEPS) / "adapter.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=2e-2, atol=2e-3)


def test_loss_scaler_state_round_trips():
    """fp16's dynamic loss scale is resume state (a restart at 2^16 would skip other steps than the uninterrupted
    run); read and restored through the same attributes DeepSpeed's ZeRO optimizers use."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    from bigadapt import zero

    class Wrapper:  # what bigadapt.zero walks: a DeepSpeed optimizer wrapper over a torch optimizer
        def __init__(self):
            self.optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(2))])
            self.loss_scaler = DynamicLossScaler(init_scale=2**16, scale_window=1000, min_scale=1, delayed_shift=2,
                                                 consecutive_hysteresis=False)

    saved = Wrapper()
    saved.loss_scaler.cur_scale, saved.loss_scaler.cur_iter = 512.0, 37
    saved.loss_scaler.last_overflow_iter, saved.loss_scaler.cur_hysteresis = 30, 1
    state = zero.loss_scale_state(saved)
    assert state == {"cur_scale": 512.0, "cur_iter": 37, "last_overflow_iter": 30, "cur_hysteresis": 1}
    fresh = Wrapper()
    zero.set_loss_scale_state(fresh, state)
    assert zero.loss_scale_state(fresh) == state


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_resume_on_one_gpu_is_exact(tmp_path, stage):
    """The same on CUDA, unpatched (conftest.env() selects the CPU accelerator: this test asks for cuda)."""
    cuda = {"DS_ACCELERATOR": "cuda"}
    (tmp_path / "fp16.json").write_text(json.dumps(FP16))
    for run in ("1", "1to1"):
        _config(tmp_path, "fp16", stage, run)
    ref = tmp_path / _name("fp16", stage, "1")
    check(run_cli("train", "--config", f"{ref}.yaml", extra_env=cuda, fresh=True))
    resumed = tmp_path / _name("fp16", stage, "1to1")
    shutil.copytree(_saved(ref, SAVED), _saved(resumed, SAVED))
    check(run_cli("train", "--config", f"{resumed}.yaml", "--resume", "auto", extra_env=cuda, fresh=True))
    want, got = _tensors(ref), _tensors(resumed)
    for k in want:  # GPU kernels are not all deterministic: equal to fp32 rounding
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
    assert _state(resumed, STEPS)["loss_scale"] == _state(ref, STEPS)["loss_scale"]


if __name__ == "__main__":
    sys.exit(main(sys.argv[-2], Path(sys.argv[-1])))
