"""method.rank_pattern / method.alpha_pattern against peft's own LoraConfig given the same patterns: the same rank
and scaling on every module (peft's matching rule, first key wins) and the same forward; bad values and patterns
that select nothing refused in one line, before anything is written."""
from __future__ import annotations

import copy

import pytest
import torch

from bigadapt.config import MethodConfig
from bigadapt.errors import ConfigError
from bigadapt.methods import lora

from .conftest import TINY_LLAMA, run_cli, tiny_config, write_config
from .test_dora import base_model, inputs, max_diff

TARGETS = ["q", "v", "o", "ffn_in"]
# a regex over the dotted name, a tail name, a more specific key after a general one (the first match wins, as
# in peft, so layer 1's v_proj gets 5, not 6), and an alpha keyed by a whole name
RANKS = {"q_proj": 2, r"layers\.[0-9]+\.self_attn\.v_proj": 5, r"layers\.1\.self_attn\.v_proj": 6, "mlp.up_proj": 3}
ALPHAS = {"v_proj": 5, "model.layers.0.self_attn.o_proj": 32.0}


@pytest.mark.parametrize("rslora", [False, True])
def test_same_rank_scaling_and_forward_as_peft(rslora):
    from peft import LoraConfig, get_peft_model
    ours = base_model(TINY_LLAMA)
    theirs = copy.deepcopy(ours)
    names = lora.inject(ours.requires_grad_(False), MethodConfig(r=4, alpha=8, targets=TARGETS, rslora=rslora,
                                                                 rank_pattern=RANKS, alpha_pattern=ALPHAS))
    theirs = get_peft_model(theirs, LoraConfig(r=4, lora_alpha=8, target_modules=names, use_rslora=rslora,
                                               rank_pattern=RANKS, alpha_pattern=ALPHAS))
    mods = dict(lora.lora_modules(ours))
    seen = set()
    torch.manual_seed(2)
    with torch.no_grad():
        for name, m in mods.items():
            layer = theirs.base_model.model.get_submodule(name)
            assert m.r == layer.r["default"] and m.scaling == layer.scaling["default"], name
            seen.add((m.r, m.alpha))
            m.lora_B.normal_(0, 0.1)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(m.lora_B)
    assert seen >= {(2, 8), (5, 5), (3, 8), (4, 32.0), (4, 8)}, seen  # every pattern took effect
    assert mods["model.layers.1.self_attn.v_proj"].r == 5  # the first matching key, not the later exact one
    x = inputs()
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    print(f"\nrank/alpha patterns (rslora={rslora}) forward max|diff| {max_diff(a, b):.2e}")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("key,value,message", [
    ("rank_pattern", {"q_proj": 0}, "must be a positive integer rank"),
    ("rank_pattern", {"q_proj": 2.5}, "must be a positive integer rank"),
    ("rank_pattern", {"q_proj": True}, "must be a positive integer rank"),
    ("alpha_pattern", {"q_proj": -1}, "must be a positive number"),
    ("alpha_pattern", {"q_proj": "16"}, "must be a positive number"),
    ("rank_pattern", {"q_proj(": 2}, "is not a valid regex"),
    ("alpha_pattern", ["q_proj", 2], "give a mapping"),
])
def test_bad_values_are_one_config_error(key, value, message):
    with pytest.raises(ConfigError, match=message) as e:
        lora.validate(MethodConfig(**{key: value}))
    assert f"method.{key}" in str(e.value) and "\n" not in str(e.value)


def test_qlora_with_dora_is_refused():
    with pytest.raises(ConfigError, match="method.dora=true"):
        lora.validate(MethodConfig(name="qlora", dora=True))


def test_a_pattern_that_selects_no_target_is_refused_before_the_run_dir(tmp_path):
    # peft matches the whole name or its dotted tail: "proj" is neither for q_proj (peft would only warn)
    with pytest.raises(ConfigError, match=r"method.rank_pattern: 'proj' matches none of the 4 targeted"):
        lora.inject(base_model(TINY_LLAMA).requires_grad_(False),
                    MethodConfig(targets=["q", "v"], rank_pattern={"proj": 2}))
    run_dir = tmp_path / "run"
    method = {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"], "alpha_pattern": {"k_proj": 4}}
    proc = run_cli("train", "--config", str(write_config(tmp_path / "c.yaml", tiny_config(run_dir, TINY_LLAMA,
                                                                                           method=method))))
    assert proc.returncode == 2 and "method.alpha_pattern: 'k_proj' matches none" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr and not run_dir.exists()
