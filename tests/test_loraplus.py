"""LoRA+ (Hayou et al. 2024, `method.lr_ratio`): B's learning rate is lr_ratio x A's, in optimizer groups of its own.
peft's create_loraplus_optimizer is the reference for one AdamW step; the real loop's groups follow the schedule."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from bigadapt import engine
from bigadapt.config import config_from_dict
from bigadapt.errors import ConfigError
from bigadapt.loop import lr_at

from .conftest import REPO, check, env, tiny_config, write_config
from .test_architectures import build, loss_of, peft_twin, randomise_b

LR, WD = 1e-3, 0.01


@pytest.mark.parametrize("ratio", [16.0, 1.0])
def test_one_step_equals_peft_loraplus(ratio):
    from peft.optimizers import create_loraplus_optimizer
    _, ours = build("gemma", targets=["q_proj", "v_proj"])
    randomise_b(ours)  # B = 0 gives A no gradient: both must move for the test to see both rates
    theirs = peft_twin("gemma", ours)
    before = {n: p.detach().clone() for n, p in ours.named_parameters() if p.requires_grad}
    groups = engine.param_groups(ours, WD, lr_ratio=ratio, lr=LR)
    assert len(groups) == (2 if ratio != 1 else 1)  # A | B (no 1-D trainables here); one group without LoRA+
    optimizers = [torch.optim.AdamW(groups, lr=LR),
                  create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=ratio,
                                            loraplus_weight_decay=WD)]
    for model, opt in zip((ours, theirs), optimizers):
        loss_of(model).backward()
        opt.step()
    params = dict(theirs.named_parameters())
    for n, p in ours.named_parameters():
        if p.requires_grad:
            peft_name = f"base_model.model.{n.removesuffix('.lora_A').removesuffix('.lora_B')}." \
                        f"{n.rpartition('.')[2]}.default.weight"
            torch.testing.assert_close(p, params[peft_name], rtol=0, atol=1e-7)
    # Adam's first step moves every entry by about lr: B by lr_ratio times more than A
    step_a = max((p - before[n]).abs().max().item() for n, p in ours.named_parameters() if n.endswith("lora_A"))
    step_b = max((p - before[n]).abs().max().item() for n, p in ours.named_parameters() if n.endswith("lora_B"))
    assert step_a == pytest.approx(LR, rel=0.05) and step_b == pytest.approx(ratio * LR, rel=0.05)


# the real `bigadapt train`, each step's optimizer groups printed after the loop set their lr
GROUPS_TRAIN = """
import json, sys
from bigadapt import loop, zero
step = loop.Loop.step
def logged(self, i, *args, **kwargs):
    record = step(self, i, *args, **kwargs)
    groups = zero.torch_optimizer(self.optimizer).param_groups
    print("GROUPS " + json.dumps({"step": i, "lr": record["lr"], "groups": [
        [g["lr"], g.get("lr_ratio", 1.0), sum(p.numel() for p in g["params"])] for g in groups]}), flush=True)
    return record
loop.Loop.step = logged
from bigadapt.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_the_loop_runs_b_at_ratio_times_the_schedule(tmp_path):
    script = tmp_path / "groups_train.py"
    script.write_text(GROUPS_TRAIN)
    cfg = tiny_config(tmp_path / "run", method={"lr_ratio": 4.0},
                      train={"max_steps": 4, "warmup_steps": 2, "schedule": "linear", "lr": 2e-3})
    proc = check(subprocess.run([sys.executable, str(script), "train", "--config",
                                 str(write_config(tmp_path / "c.yaml", cfg))], cwd=REPO, env=env(),
                                capture_output=True, text=True, timeout=300))
    steps = [json.loads(line[7:]) for line in proc.stdout.splitlines() if line.startswith("GROUPS ")]
    run_cfg = config_from_dict(cfg)
    assert [s["step"] for s in steps] == [0, 1, 2, 3]
    # tiny GPT-2, LoRA on q and v of c_attn: B is (2 slices x d) x r per layer
    b_numel = run_cfg.model.arch["n_layer"] * 2 * run_cfg.model.arch["n_embd"] * run_cfg.method.r
    for s in steps:
        lr = lr_at(s["step"], run_cfg, 4)
        assert s["lr"] == pytest.approx(lr)
        b = [g for g in s["groups"] if g[1] == 4.0]
        assert sum(g[2] for g in b) == b_numel and all(g[0] == pytest.approx(4.0 * lr) for g in b)
        assert all(g[0] == pytest.approx(lr) for g in s["groups"] if g[1] == 1.0)
    assert steps[1]["groups"][-1][0] == pytest.approx(4.0 * 2e-3)  # after warmup: ratio x the peak lr


@pytest.mark.parametrize("method,needle", [({"lr_ratio": 0.0}, "method.lr_ratio=0.0"),
                                           ({"name": "adapter_h", "lr_ratio": 16.0}, "for a LoRA method")])
def test_bad_lr_ratio_is_one_line(method, needle):
    with pytest.raises(ConfigError, match="method.lr_ratio") as e:
        config_from_dict(tiny_config("unused", method=method))
    assert needle in str(e.value) and "\n" not in str(e.value)
