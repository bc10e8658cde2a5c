"""LoRA by module names, AdapterH by blocks and `all-linear` on the architectures beyond the paper's: GPT-NeoX
(Pythia), DistilBERT, Falcon, Phi, Gemma and Mixtral-style MoE, tiny and random; peft is the reference for LoRA's
forward and one optimizer step and for what `all-linear` selects."""
from __future__ import annotations

import re

import pytest
import torch
import torch.nn.functional as F

from bigadapt import accounting, engine, methods, recompute, targets
from bigadapt import model as base_model
from bigadapt.config import config_from_dict
from bigadapt.errors import ConfigError
from bigadapt.methods.adapter import Adapter

from .conftest import tiny_config

D, L, V = 32, 2, 128
TINY = {
    "gpt_neox": {"model_type": "gpt_neox", "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": 4,
                 "intermediate_size": 64, "vocab_size": V},
    "distilbert": {"model_type": "distilbert", "dim": D, "n_layers": L, "n_heads": 4, "hidden_dim": 64,
                   "vocab_size": V, "max_position_embeddings": 64, "dropout": 0.0, "attention_dropout": 0.0,
                   "seq_classif_dropout": 0.0},
    "falcon": {"model_type": "falcon", "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": 4,
               "vocab_size": V},
    "phi": {"model_type": "phi", "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": 4,
            "intermediate_size": 64, "vocab_size": V},
    "gemma": {"model_type": "gemma", "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": 4,
              "num_key_value_heads": 2, "head_dim": 8, "intermediate_size": 64, "vocab_size": V},
    "mixtral": {"model_type": "mixtral", "hidden_size": D, "num_hidden_layers": L, "num_attention_heads": 4,
                "num_key_value_heads": 2, "intermediate_size": 64, "vocab_size": V, "num_local_experts": 4,
                "num_experts_per_tok": 2},
}
# LoRA targets given as module names (what a peft user writes), and how many modules they select per block
PATTERNS = {
    "gpt_neox": (["query_key_value", "dense_4h_to_h"], 2), "distilbert": (["q_lin", "v_lin"], 2),
    "falcon": (["query_key_value", "dense_h_to_4h"], 2), "phi": (["q_proj", "self_attn.dense", "fc2"], 3),
    "gemma": (["q_proj", "v_proj", "down_proj"], 3), "mixtral": (["q_proj", "k_proj", "v_proj", "o_proj"], 4),
}
NORMS_PER_BLOCK = {"gpt_neox": 2, "distilbert": 2, "falcon": 1, "phi": 1, "gemma": 2, "mixtral": 2}


def objective(arch: str) -> str:
    return "seq_cls" if arch == "distilbert" else "causal_lm"  # DistilBERT has no causal LM head


def cfg_of(arch: str, **method):
    method = dict({"name": "lora", "r": 4, "alpha": 8, "targets": PATTERNS[arch][0], "train_head": False}, **method)
    return config_from_dict(tiny_config("unused", arch=TINY[arch], model={"objective": objective(arch)},
                                        method=method))


def build(arch: str, **method):
    cfg = cfg_of(arch, **method)
    model = base_model.build_base(cfg.model, 0)
    methods.apply_seeded(model, cfg)
    return cfg, model


IDS = torch.randint(1, V, (2, 10), generator=torch.Generator().manual_seed(0))


def loss_of(model) -> torch.Tensor:
    logits = model(input_ids=IDS).logits
    if logits.dim() == 2:  # seq_cls
        return F.cross_entropy(logits, torch.tensor([0, 1]))
    return F.cross_entropy(logits[:, :-1].flatten(0, 1), IDS[:, 1:].flatten())


def peft_twin(arch: str, ours, r: int = 4, alpha: int = 8, target_modules=None):
    """The same base under peft's LoRA, with our (randomised) A and B copied in."""
    from peft import LoraConfig, get_peft_model
    cfg = cfg_of(arch)
    base = base_model.build_base(cfg.model, 0)
    wrapped = [n for n, m in ours.named_modules() if hasattr(m, "lora_A")]
    theirs = get_peft_model(base, LoraConfig(r=r, lora_alpha=alpha, target_modules=target_modules or wrapped,
                                             lora_dropout=0.0, init_lora_weights=False))
    params = dict(theirs.named_parameters())
    with torch.no_grad():
        for n in wrapped:
            m = ours.get_submodule(n)
            params[f"base_model.model.{n}.lora_A.default.weight"].copy_(m.lora_A)
            params[f"base_model.model.{n}.lora_B.default.weight"].copy_(m.lora_B)
    return theirs


def randomise_b(model) -> None:
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith("lora_B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


@pytest.mark.parametrize("arch", list(TINY))
def test_lora_by_module_names_matches_peft_forward_and_one_step(arch):
    cfg, ours = build(arch)
    wrapped = [n for n, m in ours.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == L * PATTERNS[arch][1]
    randomise_b(ours)  # B = 0 would hide every difference in A or the scaling
    theirs = peft_twin(arch, ours)
    ours.train(), theirs.train()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids=IDS).logits, theirs(input_ids=IDS).logits, rtol=0, atol=1e-5)
    frozen = {n: p.clone() for n, p in ours.named_parameters() if not p.requires_grad}
    for model in (ours, theirs):
        opt = torch.optim.AdamW(engine.param_groups(model, 0.01), lr=1e-2)
        loss = loss_of(model)
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = ours(input_ids=IDS).logits
        torch.testing.assert_close(after, theirs(input_ids=IDS).logits, rtol=0, atol=1e-5)
    assert all(torch.equal(p, frozen[n]) for n, p in ours.named_parameters() if not p.requires_grad)
    assert not torch.allclose(after, base_model.build_base(cfg.model, 0)(input_ids=IDS).logits, atol=1e-4)


@pytest.mark.parametrize("arch", list(TINY))
def test_adapter_h_finds_the_blocks_and_starts_as_the_base(arch):
    cfg, model = build(arch, name="adapter_h")
    adapters = [n for n, m in model.named_modules() if isinstance(m, Adapter)]
    assert len(adapters) == 2 * L  # after o and after the FFN (Mixtral: the whole MoE block) of every block
    if arch == "mixtral":
        assert all(n.endswith((".self_attn.o_proj", ".mlp")) for n in adapters)
    norms = {n.rpartition(".")[0] for n, p in model.named_parameters() if p.requires_grad and "adapter_" not in n}
    assert len(norms) == L * NORMS_PER_BLOCK[arch] and all(targets.is_norm(model.get_submodule(n)) for n in norms)
    plain = base_model.build_base(cfg.model, 0)
    model.eval(), plain.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids=IDS).logits, plain(input_ids=IDS).logits, rtol=0, atol=0)
    model.train()
    loss = loss_of(model)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # the meta-device build of `bigadapt estimate` counts the same trainable tensors
    run, _ = accounting.shapes(cfg)
    assert sum(n for _, n, t, _ in run.tensors if t) == sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch", list(TINY))
def test_every_per_block_method_finds_the_blocks(arch):
    """AdapterL/P, PreLayer and FTTop1 inject and get gradients; FTTop1 is the last block and the final norm."""
    for name in ("adapter_l", "adapter_p", "pre_layer", "ft_top_k"):
        _, model = build(arch, name=name, l_p=2, l_i=1, top_k=1)
        loss = loss_of(model)
        loss.backward()
        trained = [p for p in model.parameters() if p.requires_grad]
        assert torch.isfinite(loss) and trained and all(p.grad is not None for p in trained), name
    blocks_name, blocks = targets.layer_list(model)
    final = targets.final_norm(model)
    assert len(final) == (0 if arch == "distilbert" else 1)  # post-LN DistilBERT has none after its blocks
    assert sum(p.numel() for p in trained) == sum(p.numel() for p in blocks[-1].parameters()) + sum(
        p.numel() for n in final for p in model.get_submodule(n).parameters())


@pytest.mark.parametrize("arch,spec,needle", [
    ("gpt_neox", "q", "target it whole: method.targets=[query_key_value]"),
    ("falcon", "v", "target it whole: method.targets=[query_key_value]"),
    ("mixtral", "ffn_out", "MixtralExperts"),
    ("mixtral", "experts", "not an nn.Linear"),
])
def test_what_cannot_be_a_lora_target_is_one_line(arch, spec, needle):
    with pytest.raises(ConfigError, match="method.targets") as e:
        build(arch, targets=[spec])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("arch,names", [("distilbert", ["q", "v"]), ("phi", ["q", "v", "o", "ffn_out"]),
                                        ("gemma", ["q", "k", "ffn_gate"]), ("mixtral", ["q", "v"]),
                                        ("gpt_neox", ["o", "ffn_in"]), ("falcon", ["o", "ffn_out"])])
def test_paper_names_are_mapped(arch, names):
    model = base_model.build_meta(cfg_of(arch).model)
    assert len(targets.resolve(model, names)) == L * len(names)


# ---------------------------------------------------------------- model.blocks
T5 = {"model_type": "t5", "d_model": D, "num_layers": L, "num_heads": 4, "d_ff": 64, "d_kv": 8, "vocab_size": V}


def t5_cfg(**sections):
    return config_from_dict(tiny_config("unused", arch=T5, **sections))


def test_lora_and_full_need_no_blocks_but_per_block_methods_say_which_key():
    """T5 has two block lists (encoder and decoder): nothing can pick one, and module names need none. (BitFit
never looks for blocks: test_bitfit_on_a_fused_qkv_model.)"""
    lora = t5_cfg(method={"targets": ["SelfAttention.q", "SelfAttention.v"]})
    run, _ = accounting.shapes(lora)  # `bigadapt estimate`
    # SelfAttention q and v of 2L blocks (encoder and decoder), each r x d + d x r
    assert sum(n for name, n, t, _ in run.tensors if t and "lora_" in name) == 2 * L * 2 * 4 * (D + 4 * 8)
    assert run.largest_block > 0
    full = accounting.shapes(t5_cfg(method={"name": "full"}))
    assert sum(n for _, n, t, _ in full[0].tensors if t) == full[1].total  # (T5 has no biases for BitFit)
    for method in ({"name": "adapter_h"}, {"name": "ft_top_k", "top_k": 1}, {"name": "pre_layer", "l_p": 2}):
        with pytest.raises(ConfigError, match=r"^model\.blocks: .*e\.g\. model\.blocks=transformer\.encoder\.block$"):
            accounting.shapes(t5_cfg(method=method))
    model = base_model.build_meta(lora.model)
    with pytest.raises(ConfigError, match=r"^model\.blocks: .*train\.activation_checkpointing=false$"):
        recompute.enable(model, config_from_dict(tiny_config("unused", train={"activation_checkpointing": True}))
                         .train, stage=0)


def test_model_blocks_names_the_list_and_is_checked():
    cfg = t5_cfg(model={"blocks": "transformer.decoder.block"}, method={"name": "ft_top_k", "top_k": 1})
    names = methods.apply(base_model.build_meta(cfg.model), cfg)
    assert {n.split(".")[2:4] == ["block", "1"] or n.startswith("transformer.decoder.final_layer_norm")
            for n in names if not n.startswith("classification_head")} == {True}
    _, model = build("gpt_neox", name="adapter_h")  # the named list overrides the search (here: the same one)
    assert getattr(model, targets.BLOCKS_ATTR, None) is None
    model = base_model.build_base(config_from_dict(tiny_config("unused", arch=TINY["gpt_neox"], model={
        "objective": "causal_lm", "blocks": "gpt_neox.layers"})).model, 0)
    assert model.bigadapt_blocks == "gpt_neox.layers" and targets.layer_list(model)[0] == "gpt_neox.layers"
    for bad, needle in (("transformer.nope", "no module"), ("transformer.shared", "Embedding, not a ModuleList")):
        with pytest.raises(ConfigError, match=rf"^model\.blocks='{bad}': .*{needle}.*e\.g\. model\.blocks="):
            base_model.build_meta(t5_cfg(model={"blocks": bad}).model)


def test_an_unlisted_architecture_is_found_by_its_depth(monkeypatch):
    """A ModuleList of num_hidden_layers modules of one class is the blocks, whatever its name (MPT's
    `transformer.blocks` here)."""
    mpt = {"model_type": "mpt", "d_model": D, "n_layers": L, "n_heads": 4, "vocab_size": V}
    model = base_model.build_meta(config_from_dict(tiny_config("unused", arch=mpt)).model)
    assert targets.layer_list(model)[0] == "transformer.blocks"
    monkeypatch.setattr(targets, "LAYER_LISTS", ())  # the same fallback finds the listed ones too
    assert targets.layer_list(base_model.build_meta(cfg_of("gpt_neox").model))[0] == "gpt_neox.layers"


# ---------------------------------------------------------------- all-linear
@pytest.mark.parametrize("arch", ["gpt_neox", "phi", "gemma", "mixtral"])
def test_all_linear_selects_what_peft_selects(arch):
    _, ours = build(arch, targets=["all-linear"])
    wrapped = sorted(n for n, m in ours.named_modules() if hasattr(m, "lora_A"))
    theirs = peft_twin(arch, ours, target_modules="all-linear")
    peft_wrapped = sorted(n.removeprefix("base_model.model.") for n, m in theirs.named_modules()
                          if hasattr(m, "lora_A") and hasattr(m, "base_layer"))
    # peft also adapts Mixtral's router and its 3-D expert tensors, which are no nn.Linear; bigadapt's LoRA wraps
    # Linear layers only
    peft_wrapped = [n for n in peft_wrapped if not re.search(r"\.mlp\.(gate|experts)(\.|$)", n)]
    assert wrapped == peft_wrapped and "lm_head" not in wrapped and len(wrapped) >= 4 * L


def test_all_linear_leaves_heads_out():
    _, ours = build("distilbert", targets=["all-linear"])  # in the blocks only: not pre_classifier/classifier
    wrapped = [n for n, m in ours.named_modules() if hasattr(m, "lora_A")]
    assert len(wrapped) == 6 * L and all(n.startswith("distilbert.transformer.layer.") for n in wrapped)
    model = base_model.build_meta(t5_cfg().model)  # blocks unknown: every Linear but the head
    found = {t.name for t in targets.resolve(model, ["all-linear"])}
    assert not any(n.startswith("classification_head") for n in found)
    assert len(found) == L * (4 + 2) + L * (4 + 4 + 2)  # encoder (attention, FFN), decoder (self, cross, FFN)


def test_gpt2_conv1d_counts_as_linear():
    gpt2 = {"model_type": "gpt2", "n_layer": L, "n_embd": D, "n_head": 4, "vocab_size": V}
    model = base_model.build_meta(config_from_dict(tiny_config("unused", arch=gpt2)).model)
    found = targets.resolve(model, ["all-linear"])
    assert len(found) == 4 * L and all(t.slices is None for t in found)


def test_bitfit_on_a_fused_qkv_model():
    """All biases train on GPT-NeoX; the BitFit paper's q-bias subset is refused there (q is interleaved)."""
    _, model = build("gpt_neox", name="bitfit")
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trained and all(n.endswith(".bias") for n in trained) and any("query_key_value" in n for n in trained)
    with pytest.raises(ConfigError, match=r"^method.bitfit_subset=true: .*'gpt_neox'; use bitfit_subset=false$"):
        build("gpt_neox", name="bitfit", bitfit_subset=True)
