"""gaussian/PiSSA/OLoRA initialisation (method.lora_init) against huggingface/peft's init_lora_weights on the same
base: A, B and the residual base weight equal, the model unchanged at init, merge = W0 + the trained delta, and
the export loads in peft on the ORIGINAL base with equal logits."""
from __future__ import annotations

import copy

import pytest
import torch

from bigadapt import methods
from bigadapt.config import config_from_dict
from bigadapt.errors import ConfigError
from bigadapt.methods.lora import lora_modules
from bigadapt.model import build_base

from .conftest import TINY_GPT2, TINY_LLAMA, tiny_config


def _cfg(tmp_path, arch, **method):
    return config_from_dict(tiny_config(tmp_path / "run", arch, method=dict(r=4, alpha=8, **method)))


def _ids():
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, 96, (3, 12), generator=g)


def _pair(tmp_path, arch, init, targets, peft_targets, fan_in_fan_out=False, rslora=False):
    from peft import LoraConfig, get_peft_model
    cfg = _cfg(tmp_path, arch, targets=targets, lora_init=init, rslora=rslora)
    base = build_base(cfg.model, 0).eval()
    original = copy.deepcopy(base)
    theirs = get_peft_model(copy.deepcopy(base), LoraConfig(
        r=4, lora_alpha=8, target_modules=peft_targets, init_lora_weights=init, fan_in_fan_out=fan_in_fan_out,
        use_rslora=rslora, modules_to_save=["score"]))
    methods.apply(base, cfg)
    return base, theirs.eval(), original


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_init_equals_peft_on_llama(tmp_path, init):
    ours, theirs, original = _pair(tmp_path, TINY_LLAMA, init, ["q", "v"], ["q_proj", "v_proj"], rslora=True)
    peft_layers = {n.removeprefix("base_model.model."): m for n, m in theirs.named_modules() if hasattr(m, "lora_A")}
    assert len(lora_modules(ours)) == 4
    for name, m in lora_modules(ours):
        p = peft_layers[name]
        torch.testing.assert_close(m.lora_A, p.lora_A["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.lora_B, p.lora_B["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.base_layer.weight, p.base_layer.weight, rtol=0, atol=1e-6)
        assert (m.base_layer.weight - original.get_submodule(name).weight).abs().max() > 1e-3  # a residual
    _same_logits(ours, original)


def test_pissa_equals_peft_on_gpt2_conv1d(tmp_path):
    ours, theirs, original = _pair(tmp_path, TINY_GPT2, "pissa", ["c_attn"], ["c_attn"], fan_in_fan_out=True)
    for name, m in lora_modules(ours):
        p = theirs.get_submodule(f"base_model.model.{name}")
        torch.testing.assert_close(m.lora_A, p.lora_A["default"].weight, rtol=0, atol=1e-6)
        torch.testing.assert_close(m.base_layer.weight, p.base_layer.weight, rtol=0, atol=1e-6)
    _same_logits(ours, original)


def test_pissa_per_slice_on_fused_qv(tmp_path):
    """GPT-2's q,v slices of c_attn: each slice its own SVD; the residual leaves k's rows as they were."""
    cfg = _cfg(tmp_path, TINY_GPT2, targets=["q", "v"], lora_init="pissa")
    model = build_base(cfg.model, 0).eval()
    original = copy.deepcopy(model)
    methods.apply(model, cfg)
    name, m = lora_modules(model)[0]
    w0, w = original.get_submodule(name).weight.T, m.base_layer.weight.T
    d = m.out_features // 3
    assert torch.equal(w[d:2 * d], w0[d:2 * d])
    q = torch.linalg.svd(w0[:d])
    best_q = (q.U[:, :4] * q.S[:4]) @ q.Vh[:4]  # the top-4 approximation PiSSA moves into A, B
    torch.testing.assert_close(w0[:d] - w[:d], best_q, rtol=0, atol=1e-5)
    _same_logits(model, original)


def test_gaussian_draws_a_with_std_one_over_r(tmp_path):
    cfg = config_from_dict(tiny_config(tmp_path / "run", TINY_LLAMA, method=dict(
        r=16, alpha=16, targets=["q", "v", "k", "o"], lora_init="gaussian")))
    model = build_base(cfg.model, 0)
    methods.apply(model, cfg)
    A = torch.cat([m.lora_A.flatten() for _, m in lora_modules(model)])
    assert abs(A.std().item() - 1 / 16) < 0.004 and abs(A.mean().item()) < 0.004  # 16k draws: ~0.0005 noise
    assert all(torch.count_nonzero(m.lora_B) == 0 for _, m in lora_modules(model))


def test_merge_gives_w0_plus_trained_delta(tmp_path):
    cfg = _cfg(tmp_path, TINY_LLAMA, targets=["q", "v"], lora_init="pissa")
    model = build_base(cfg.model, 0).eval()
    original = copy.deepcopy(model)
    methods.apply(model, cfg)
    A0B0 = {n: m.delta_weight() for n, m in lora_modules(model)}
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in lora_modules(model):  # "training": move A and B
            m.lora_A.add_(0.05 * torch.randn(m.lora_A.shape, generator=g))
            m.lora_B.add_(0.05 * torch.randn(m.lora_B.shape, generator=g))
    trained = {n: m.delta_weight() - A0B0[n] for n, m in lora_modules(model)}
    with torch.no_grad():
        before = model(input_ids=_ids()).logits
    methods.get("lora").merge(model)
    for name, m in lora_modules(model):
        w0 = original.get_submodule(name).weight
        torch.testing.assert_close(m.base_layer.weight, w0 + trained[name], rtol=0, atol=1e-5)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, before, rtol=1e-5, atol=1e-5)


def test_quantized_base_and_oversized_rank_are_one_line_config_errors(tmp_path):
    from bigadapt.methods import lora_init
    cfg = _cfg(tmp_path, TINY_LLAMA, targets=["q"], lora_init="pissa")
    model = build_base(cfg.model, 0)
    methods.apply(model, cfg)
    _, m = lora_modules(model)[0]
    m.base_layer.weight.data = m.base_layer.weight.data.to(torch.uint8)  # what a 4-bit bitsandbytes weight stores
    with pytest.raises(ConfigError, match=r"method.lora_init='pissa'.*quantized"):
        lora_init.init(m, "pissa", "q")
    with pytest.raises(ConfigError, match="method.lora_init='svd'"):
        lora_init.init(m, "svd")
    big = config_from_dict(tiny_config(tmp_path / "r", TINY_LLAMA, method=dict(r=40, alpha=8, targets=["k"],
                                                                                lora_init="olora")))
    with pytest.raises(ConfigError, match="lower method.r to at most 32"):  # k_proj of 2 kv heads: 32 x 64
        methods.apply(build_base(big.model, 0), big)


def test_meta_build_skips_the_numerics(tmp_path):
    from bigadapt import accounting
    cfg = _cfg(tmp_path, TINY_LLAMA, targets=["q", "v"], lora_init="pissa")
    shape, _ = accounting.shapes(cfg)  # the accounting's meta build: no SVD of meta tensors
    assert shape is not None


def _same_logits(model, original):
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=_ids()).logits, original(input_ids=_ids()).logits,
                                   rtol=1e-5, atol=1e-5)


def test_pissa_run_exports_as_plain_lora_on_the_original_base(tmp_path, arch=TINY_GPT2, targets=("q", "v")):
    """A trained PiSSA run (residual base) exported to peft: rank 2r, loaded by peft onto the ORIGINAL base, gives
    the run's logits. GPT-2's fused q,v slices and Conv1D layout included."""
    import json

    from peft import PeftModel

    from bigadapt.export import load_trained

    from .conftest import check, run_cli, write_config
    run_dir = tmp_path / "run"
    raw = tiny_config(run_dir, arch, method=dict(r=4, alpha=8, targets=list(targets), lora_init="pissa"),
                      train=dict(max_steps=3, lr=2e-2))
    check(run_cli("train", "--config", str(write_config(tmp_path / "cfg.yaml", raw))))
    ours, _, cfg = load_trained(run_dir)
    out = tmp_path / "peft"
    check(run_cli("export", str(run_dir), str(out)))
    conf = json.loads((out / "adapter_config.json").read_text())
    assert set(conf["rank_pattern"].values()) == {8 * (2 if arch is TINY_GPT2 else 1)}  # 2r (x2 fused slices)
    original = build_base(cfg.model, cfg.train.seed).eval()
    theirs = PeftModel.from_pretrained(original, out).eval()
    with torch.no_grad():
        expected = ours(input_ids=_ids()).logits
        torch.testing.assert_close(theirs(input_ids=_ids()).logits, expected, rtol=1e-5, atol=1e-5)
        with theirs.disable_adapter():  # the trained delta matters: the original base alone differs
            assert not torch.allclose(theirs(input_ids=_ids()).logits, expected, atol=1e-4)
