"""Every architecture of tests/test_architectures.py trains a step on 2 ranks under ZeRO-3, with LoRA by module names
and with AdapterH by blocks (and LoRA+'s groups surviving DeepSpeed's optimizer wrapper).

One `deepspeed --num_gpus 2` launch runs this file as a script: each case builds its engine in the same two
processes (conftest.zero3_engine), takes one optimizer step and forwards again; rank 0 prints both losses. The
first loss must equal the plain single-process base's (LoRA's B and AdapterH's W_up start at zero), so the
sharded forward of each architecture is checked, and the second must differ (the step trained something).
"""
from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from tests.conftest import check, launch
from tests.test_architectures import PATTERNS, TINY, loss_of, objective

pytestmark = pytest.mark.distributed

CASES = {f"{arch}-{kind}": (arch, method) for arch in TINY for kind, method in (
    ("lora", {"name": "lora", "r": 4, "alpha": 8, "targets": PATTERNS[arch][0]}),
    ("adapter_h", {"name": "adapter_h", "r": 4}))}
CASES["gemma-loraplus"] = ("gemma", {"name": "lora", "r": 4, "alpha": 8, "targets": ["q_proj"], "lr_ratio": 4.0})


def main() -> int:
    from bigadapt import zero
    from tests.conftest import zero3_engine
    for case, (arch, method) in CASES.items():
        # batch 8 = micro-batch 4 x 2 ranks: every eng.step() is an optimizer step
        eng = zero3_engine(arch=TINY[arch], model={"objective": objective(arch)},
                           method=dict(method, train_head=False), train={"lr": 1e-2, "batch_size": 8})
        ratios = sorted(g.get("lr_ratio", 1.0) for g in zero.torch_optimizer(eng.optimizer).param_groups)
        before = loss_of(eng)
        eng.backward(before)
        eng.step()
        with torch.no_grad():
            after = loss_of(eng)
        if zero.rank() == 0:
            print("CASE " + json.dumps({"case": case, "before": before.item(), "after": after.item(),
                                        "ratios": ratios}), flush=True)
        del eng
        zero.unregister()  # the next case's meta-device estimate must not build under zero.Init
    return 0


def test_every_architecture_trains_a_step_under_zero3():
    from bigadapt import model as base_model
    from bigadapt.config import config_from_dict
    from tests.conftest import tiny_config
    out = check(launch(2, script="tests/distributed/test_architectures.py", timeout=600)).stdout
    found = {r["case"]: r for r in (json.loads(line[5:]) for line in out.splitlines() if line.startswith("CASE "))}
    assert sorted(found) == sorted(CASES)
    for case, (arch, _) in CASES.items():
        r = found[case]
        cfg = config_from_dict(tiny_config("unused", arch=TINY[arch], model={"objective": objective(arch)}))
        with torch.no_grad():
            plain = loss_of(base_model.build_base(cfg.model, 0)).item()
        assert math.isfinite(r["before"]) and math.isfinite(r["after"]), case
        assert r["before"] == pytest.approx(plain, abs=1e-5), case
        assert r["after"] != r["before"], case
    assert found["gemma-loraplus"]["ratios"] == [1.0, 4.0] and found["gemma-lora"]["ratios"] == [1.0]


if __name__ == "__main__":
    sys.exit(main())
