"""Numerics of bitfit, adapter_h/l/p/d, full and ft_top_k on tiny plain PyTorch models (CPU, seconds).

References are written here with torch.nn.functional and forward hooks on an untouched copy of the base,
so the method's placement (which module it wraps) is checked as well as its arithmetic.
"""
from __future__ import annotations

import copy
from functools import partial

import pytest
import torch
import torch.nn.functional as F

from bigadapt import engine, methods
from bigadapt import model as base_model
from bigadapt import targets as tg
from bigadapt.config import config_from_dict
from bigadapt.errors import BigadaptError, ConfigError
from bigadapt.methods import adapter, bitfit, full
from tests.conftest import TINY_GPT2, TINY_LLAMA, run_cli, tiny_config, write_config
from tests.distributed.test_methods import TINY_BERT, TINY_ROBERTA

TINY_OPT = {"model_type": "opt", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4, "ffn_dim": 128,
            "vocab_size": 96, "max_position_embeddings": 64, "word_embed_proj_dim": 64, "dropout": 0.0,
            "attention_dropout": 0.0, "pad_token_id": 1}
ARCHS = {"gpt2": TINY_GPT2, "bert": TINY_BERT, "roberta": TINY_ROBERTA, "opt": TINY_OPT, "llama": TINY_LLAMA}
ADAPTERS = ("adapter_h", "adapter_l", "adapter_p", "adapter_d")
HEADS = ("score.", "classifier.")
IDS = torch.randint(2, 96, (3, 12), generator=torch.Generator().manual_seed(0))


def build(arch: str = "gpt2", objective: str = "seq_cls", **method):
    """(config, untouched base, the same base with the method applied), both in eval mode."""
    cfg = config_from_dict({"model": {"arch": dict(ARCHS[arch]), "objective": objective},
                            "method": {"r": 4, **method}})
    plain = base_model.build_base(cfg.model, seed=0).eval()
    model = copy.deepcopy(plain)
    torch.manual_seed(1)
    methods.apply(model, cfg)
    return cfg, plain, model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=IDS).logits


def randomise_adapters(model, seed: int = 2) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".adapter_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


# ---------------------------------------------------------------- adapters
@pytest.mark.parametrize("arch", list(ARCHS))
@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_at_init_is_exactly_the_base(arch, name):
    _, plain, model = build(arch, name=name, adapter_drop=1 if name == "adapter_d" else 0)
    assert torch.equal(logits(model), logits(plain))  # W_up = 0, b_up = 0: the added term is exactly 0


def reference_hook(mod: adapter.Adapter):
    """The adapter written with torch.nn.functional from the wrapper's tensors, as a hook on the plain module."""
    down, up, ln = mod.adapter_down, mod.adapter_up, mod.adapter_ln
    act = partial(F.gelu, approximate="tanh") if mod.variant == "adapter_h" else F.relu

    def hook(_module, _inputs, h):
        z = F.layer_norm(h, h.shape[-1:], ln.weight, ln.bias, ln.eps) if ln is not None else h
        return h + F.linear(act(F.linear(z, down.weight, down.bias)), up.weight, up.bias)
    return hook


@pytest.mark.parametrize("arch", ["gpt2", "bert", "llama"])
@pytest.mark.parametrize("name", ADAPTERS)
def test_adapter_forward_equals_a_plain_pytorch_reference(arch, name):
    _, plain, model = build(arch, name=name, adapter_drop=1 if name == "adapter_d" else 0)
    randomise_adapters(model)
    wrapped = {n: m for n, m in model.named_modules() if isinstance(m, adapter.Adapter)}
    handles = [plain.get_submodule(n).register_forward_hook(reference_hook(m)) for n, m in wrapped.items()]
    got, ref = logits(model), logits(plain)
    for h in handles:
        h.remove()
    assert not torch.allclose(ref, logits(plain))  # the adapters really change the output
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name,where,per_layer", [("adapter_h", ("o", "ffn_out"), 2), ("adapter_l", ("ffn_out",), 1),
                                                  ("adapter_p", ("ffn_out",), 1)])
@pytest.mark.parametrize("arch", list(ARCHS))
def test_adapters_wrap_the_papers_sublayers(arch, name, where, per_layer):
    _, plain, model = build(arch, name=name)
    expected = {t.name for t in tg.resolve(plain, list(where))}
    wrapped = {n for n, m in model.named_modules() if isinstance(m, adapter.Adapter)}
    assert wrapped == expected and len(wrapped) == per_layer * 2


def test_adapter_d_drops_the_lowest_layers():
    _, _, model = build("gpt2", name="adapter_d", adapter_drop=1)
    wrapped = [n for n, m in model.named_modules() if isinstance(m, adapter.Adapter)]
    assert wrapped == ["transformer.h.1.mlp.c_proj"]


def test_adapter_h_trains_the_block_layer_norms_and_adapter_l_its_own():
    _, _, h = build("gpt2", name="adapter_h")
    trained = {n for n, p in h.named_parameters() if p.requires_grad and not n.startswith("score.")}
    assert {n for n in trained if ".adapter_" not in n} == {
        f"transformer.h.{i}.{ln}.{w}" for i in (0, 1) for ln in ("ln_1", "ln_2") for w in ("weight", "bias")}
    _, _, lin = build("gpt2", name="adapter_l")
    assert all(".adapter_" in n for n, p in lin.named_parameters() if p.requires_grad and not n.startswith("score."))
    assert sum(".adapter_ln." in n for n, p in lin.named_parameters() if p.requires_grad) == 4


def test_adapter_in_fp32_on_a_bf16_base():
    cfg = config_from_dict({"model": {"arch": dict(TINY_GPT2), "objective": "seq_cls", "dtype": "bf16"},
                            "method": {"name": "adapter_h", "r": 4}})
    model = base_model.build_base(cfg.model, seed=0)
    methods.apply(model, cfg)
    m = model.get_submodule("transformer.h.0.mlp.c_proj")
    assert m.adapter_down.weight.dtype == torch.float32
    assert model(input_ids=IDS).logits.dtype == torch.bfloat16


def test_adapters_cannot_be_merged():
    _, _, model = build("gpt2", name="adapter_h")
    with pytest.raises(BigadaptError, match="adapter_h: adapters cannot be merged") as e:
        methods.get("adapter_h").merge(model)
    assert "\n" not in str(e.value) and "nonlinearity" in str(e.value)


# ---------------------------------------------------------------- bitfit
@pytest.mark.parametrize("arch", ["gpt2", "bert", "roberta", "opt"])
def test_bitfit_trains_only_biases(arch):
    _, _, model = build(arch, name="bitfit")
    trained = [n for n, p in model.named_parameters() if p.requires_grad and not n.startswith(HEADS)]
    assert trained and all(n.endswith(".bias") for n in trained)
    assert len(trained) == sum(n.endswith(".bias") for n, _ in model.named_parameters() if not n.startswith(HEADS))


def test_bitfit_subset_on_fused_gpt2_trains_exactly_the_query_slice():
    _, plain, model = build("gpt2", name="bitfit", bitfit_subset=True)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("score."))
    assert trained == [f"transformer.h.{i}.{x}" for i in (0, 1) for x in ("attn.c_attn.bitfit_bias", "mlp.c_fc.bias")]
    assert torch.equal(logits(model), logits(plain))  # zero-initialised
    d = TINY_GPT2["n_embd"]
    delta = torch.randn(d, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        for i in (0, 1):
            model.get_submodule(f"transformer.h.{i}.attn.c_attn").bitfit_bias.copy_(delta)
            plain.get_submodule(f"transformer.h.{i}.attn.c_attn").bias[:d] += delta  # b_q only
    torch.testing.assert_close(logits(model), logits(plain), rtol=1e-5, atol=1e-6)
    merged_ref = logits(model)
    bitfit.merge(model)
    torch.testing.assert_close(logits(model), merged_ref, rtol=1e-5, atol=1e-6)
    bitfit.unwrap(model)
    assert not any(isinstance(m, bitfit.SliceBias) for m in model.modules())
    torch.testing.assert_close(logits(model), merged_ref, rtol=1e-5, atol=1e-6)


def test_bitfit_subset_on_bert_unfreezes_query_and_intermediate_biases():
    _, _, model = build("bert", name="bitfit", bitfit_subset=True)
    trained = sorted(n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("classifier."))
    assert trained == sorted(f"bert.encoder.layer.{i}.{x}.bias" for i in (0, 1)
                             for x in ("attention.self.query", "intermediate.dense"))


def test_bitfit_merge_is_a_no_op_for_biases_trained_in_place():
    _, _, model = build("gpt2", name="bitfit")
    before = logits(model)
    bitfit.merge(model)
    bitfit.unmerge(model)
    bitfit.unwrap(model)
    assert torch.equal(logits(model), before)


@pytest.mark.parametrize("subset", [False, True])
def test_bitfit_on_llama_is_a_one_line_error(subset):
    with pytest.raises(ConfigError, match="method.name=bitfit: llama has no") as e:
        build("llama", name="bitfit", bitfit_subset=subset)
    assert "\n" not in str(e.value) and "choose lora or adapter_h" in str(e.value)


# ---------------------------------------------------------------- full, ft_top_k
def test_full_trains_everything_and_ft_top_k_the_last_blocks():
    _, plain, model = build("gpt2", name="full")
    assert all(p.requires_grad for p in model.parameters())
    _, _, top = build("llama", "causal_lm", name="ft_top_k", top_k=1)
    trained = {n for n, p in top.named_parameters() if p.requires_grad}
    assert trained == {n for n, _ in top.named_parameters() if n.startswith(("model.layers.1.", "model.norm."))}
    full.merge(model)
    full.unmerge(model)  # nothing to fold: the trained tensors are the base's


# ---------------------------------------------------------------- every method: gradients and a real step
CASES = [("bitfit", {}), ("bitfit", {"bitfit_subset": True}), ("adapter_h", {}), ("adapter_l", {}),
         ("adapter_p", {}), ("adapter_d", {"adapter_drop": 1}), ("full", {}), ("ft_top_k", {"top_k": 1})]


@pytest.mark.parametrize("name,extra", CASES)
def test_gradients_reach_only_the_methods_params_and_frozen_stay_bit_identical(name, extra):
    cfg, _, model = build("gpt2", name=name, **extra)
    model.train()
    randomise_adapters(model)  # so W_down gets a gradient too (it gets none while W_up = 0)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    trained = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    groups = engine.param_groups(model, weight_decay=0.1)
    opt = torch.optim.AdamW(groups, lr=1e-2)
    loss = F.cross_entropy(model(input_ids=IDS).logits, torch.tensor([0, 1, 1]))
    loss.backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n
    opt.step()
    params = dict(model.named_parameters())
    for n, before in frozen.items():
        assert torch.equal(params[n], before), n
    changed = [n for n, before in trained.items() if not torch.equal(params[n], before)]
    assert len(changed) == len(trained), sorted(set(trained) - set(changed))


# ---------------------------------------------------------------- one-line errors
@pytest.mark.parametrize("method,key", [
    ({"name": "adapter_h", "r": 0}, "method.r"),
    ({"name": "adapter_p", "adapter_drop": 1}, "method.adapter_drop"),
    ({"name": "ft_top_k", "top_k": 0}, "method.top_k"),
])
def test_impossible_settings_fail_before_any_model(method, key):
    with pytest.raises(ConfigError, match=key) as e:
        config_from_dict({"model": {"arch": dict(TINY_GPT2)}, "method": method})
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("method,needle", [
    ({"name": "ft_top_k", "top_k": 3}, "method.top_k=3: this gpt2 has 2 layers; choose 1..2"),
    ({"name": "adapter_d", "adapter_drop": 2}, "method.adapter_drop=2: this gpt2 has 2 layers"),
])
def test_impossible_settings_for_this_model_fail_at_inject(method, needle):
    with pytest.raises(ConfigError) as e:
        build("gpt2", **method)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_adapter_validate_refuses_a_non_positive_bottleneck_directly():
    from bigadapt.config import MethodConfig
    with pytest.raises(ConfigError, match=r"method.r=-1: the adapter bottleneck size must be a positive integer"):
        adapter.validate(MethodConfig(name="adapter_h", r=-1))


def test_bitfit_on_llama_through_the_cli_is_one_line_and_exit_2(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", tiny_config(tmp_path / "run", arch=TINY_LLAMA, method={"name": "bitfit"}))
    proc = run_cli("train", "--config", str(cfg))
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [x for x in proc.stderr.splitlines() if x.startswith("bigadapt: error:")]
    assert lines == ["bigadapt: error: method.name=bitfit: llama has no bias terms; choose lora or adapter_h"]
    assert not (tmp_path / "run").exists()  # refused before any file or process group


def test_slice_bias_gradient_is_the_output_gradient_summed_over_tokens():
    from transformers.pytorch_utils import Conv1D
    d = 4
    m = bitfit.SliceBias(Conv1D(3 * d, d).requires_grad_(False), slices=(0, 2), n_parts=3)  # q and v
    g = torch.randn(2, 5, 3 * d)
    (m(torch.randn(2, 5, d)) * g).sum().backward()
    torch.testing.assert_close(m.bitfit_bias.grad, torch.cat([g[..., :d], g[..., 2 * d:]], -1).sum((0, 1)))
