"""Mixed precision at every ZeRO stage through the real CLI and launcher: save, resume exactly on the same world
size, resume on another world size.

bf16 at stage 0 is DeepSpeed's FP16_UnfusedOptimizer: Adam's state and the fp32 masters sit on separate fp32
copies of the parameters, and saving used to fail with KeyError: 'exp_avg'. fp16 cannot run here: DeepSpeed's
CPU accelerator refuses it ("Type fp16 is not supported on your device"); at stage 0 it takes the same wrapper as
bf16 (plus a loss scaler, whose state a checkpoint carries: test_loss_scaler_state_round_trips), and is covered on
a GPU by the `gpu` test at the end.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bigadapt import checkpoint

from ..conftest import check, launch, run_cli, tiny_config, train_losses, write_config

pytestmark = pytest.mark.distributed
STEPS, SAVED = 4, 2


def _run(tmp: Path, name: str, n: int, dtype: str, stage: int, resume_from: Path | None = None) -> Path:
    """A run of STEPS steps checkpointed at SAVED; with `resume_from`, one interrupted there (its checkpoint,
    nothing after) and continued with --resume auto."""
    run_dir = tmp / name
    cfg = tiny_config(run_dir, model={"arch": tiny_config(run_dir)["model"]["arch"], "objective": "seq_cls",
                                      "dtype": dtype},
                      train={"max_steps": STEPS, "save_every": SAVED, "keep_last": 5, "lr": 5e-3},
                      zero={"stage": stage, "param_persistence_threshold": 0})
    path = write_config(tmp / f"{name}.yaml", cfg)
    if resume_from is not None:
        shutil.copytree(resume_from, run_dir / "checkpoints" / resume_from.name)
    args = ["--config", str(path)] + (["--resume", "auto"] if resume_from is not None else [])
    proc = check(launch(n, *args) if n > 1 else run_cli("train", *args))
    if resume_from is not None:
        assert f"resumed from {run_dir / 'checkpoints' / resume_from.name}" in proc.stdout + proc.stderr
    return run_dir


def _saved(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"step-{step:08d}"


def _tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    last = _saved(run_dir, STEPS)
    return {**load_file(last / "adapter.safetensors"), **load_file(last / "optimizer.safetensors")}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Uninterrupted reference runs, made once per (ranks, dtype, stage) and shared by the tests below."""
    tmp, made = tmp_path_factory.mktemp("precision"), {}

    def get(n: int, dtype: str, stage: int) -> Path:
        if (n, dtype, stage) not in made:
            made[n, dtype, stage] = _run(tmp, f"ref-{n}-{dtype}-{stage}", n, dtype, stage)
        return made[n, dtype, stage]
    return get


# fp32 at stage 1 stands for 1 and 2: the same path (moments linked to DeepSpeed's flat partition before a step)
@pytest.mark.parametrize("dtype,stage", [("bf16", 0), ("bf16", 1), ("bf16", 2), ("bf16", 3), ("fp32", 1)])
def test_resume_on_one_rank_is_bitwise(runs, tmp_path, dtype, stage):
    ref = runs(1, dtype, stage)
    manifest = checkpoint.verify(_saved(ref, SAVED))
    assert all(t["dtype"] == "float32" for t in manifest["tensors"].values())  # fp32 masters, whatever the base
    resumed = _run(tmp_path, "resumed", 1, dtype, stage, resume_from=_saved(ref, SAVED))
    assert {s: v for s, v in train_losses(resumed).items() if s > SAVED} == \
        {s: v for s, v in train_losses(ref).items() if s > SAVED}
    want, got = _tensors(ref), _tensors(resumed)
    assert want.keys() == got.keys()
    assert all(torch.equal(want[k], got[k]) for k in want), [k for k in want if not torch.equal(want[k], got[k])]


@pytest.mark.parametrize("stage", [0, 3])  # the two optimizer layouts: fp32 copies (0) and ZeRO-3 partitions
def test_bf16_two_ranks_resume_on_one(runs, tmp_path, stage):
    ref = runs(2, "bf16", stage)
    resumed = _run(tmp_path, "resumed", 1, "bf16", stage, resume_from=_saved(ref, SAVED))
    _assert_close(ref, resumed)


@pytest.mark.parametrize("stage", [0, 3])
def test_bf16_one_rank_resumes_on_two(runs, tmp_path, stage):
    ref = runs(1, "bf16", stage)
    resumed = _run(tmp_path, "resumed", 2, "bf16", stage, resume_from=_saved(ref, SAVED))
    _assert_close(ref, resumed)


def _assert_close(ref: Path, got: Path) -> None:
    """Another world size sums the same numbers in another order, and bf16 working weights and gradients round
    that difference up: equal to bf16 precision, not bitwise."""
    want, have = train_losses(ref), train_losses(got)
    for s in range(SAVED + 1, STEPS + 1):
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
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 needs a GPU (DeepSpeed's CPU accelerator refuses it)")
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_fp16_resume_on_one_gpu_is_exact(runs, tmp_path, stage):
    ref = runs(1, "fp16", stage)
    resumed = _run(tmp_path, "resumed", 1, "fp16", stage, resume_from=_saved(ref, SAVED))
    want, got = _tensors(ref), _tensors(resumed)
    for k in want:  # GPU kernels are not all deterministic: equal to fp32 rounding
        torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-7)
