"""Trainable counts of bitfit, adapters, full and ft_top_k on meta-device models equal the papers' formulas.

GPT-2 medium, RoBERTa-base, a LLaMA-7B-shaped model and GPT-3 175B, built with `model.build_meta` and
`methods.apply` (the code a run uses), without allocating a weight. Task heads are excluded, as in the paper.
"""
from __future__ import annotations

import re

import pytest

from bigadapt import methods
from bigadapt.bench import counts
from bigadapt.config import config_from_dict, load_config
from bigadapt.model import build_meta
from tests.conftest import REPO

GPT2_MEDIUM = {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16}  # vocab 50257, 1024 positions
ROBERTA_BASE = {"model_type": "roberta", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                "intermediate_size": 3072, "vocab_size": 50265}
LLAMA_7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "intermediate_size": 11008}  # vocab 32000
GPT3 = counts.GPT3_175B
# (arch, objective, L, d, d_ffn)
SHAPES = {"gpt2-medium": (GPT2_MEDIUM, "causal_lm", 24, 1024, 4096),
          "roberta-base": (ROBERTA_BASE, "seq_cls", 12, 768, 3072),
          "llama-7b": (LLAMA_7B, "causal_lm", 32, 4096, 11008)}


def trainable(arch: dict, objective: str, **method) -> tuple[int, list[str]]:
    cfg = config_from_dict({"model": {"arch": arch, "objective": objective},
                            "method": dict({"train_head": False}, **method)})
    model = build_meta(cfg.model)
    methods.apply(model, cfg)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    return sum(p.numel() for p in model.parameters() if p.requires_grad), names


def adapter(d: int, r: int) -> int:
    return 2 * d * r + r + d  # one adapter: W_down, b_down, W_up, b_up


def layer_params(shape: str) -> int:
    """Every parameter of one transformer block, written out from the architecture."""
    _, _, _, d, f = SHAPES[shape]
    if shape == "gpt2-medium":  # c_attn, c_proj, c_fc, mlp.c_proj with biases; ln_1, ln_2
        return 4 * d * d + 4 * d + 2 * d * f + f + d + 4 * d
    if shape == "roberta-base":  # q k v o with biases; intermediate, output; two LayerNorms
        return 4 * (d * d + d) + 2 * d * f + f + d + 4 * d
    return 4 * d * d + 3 * d * f + 2 * d  # llama: no biases, gate/up/down, two RMSNorms


# ---------------------------------------------------------------- BitFit
def test_bitfit_is_every_bias_element():
    # GPT-2: c_attn 3d, attn.c_proj d, c_fc 4d, mlp.c_proj d, ln_1 + ln_2 2d per layer; ln_f d
    assert trainable(GPT2_MEDIUM, "causal_lm", name="bitfit")[0] == 24 * 11 * 1024 + 1024 == 271_360
    # RoBERTa: q k v o 4d, intermediate 4d, output d, two LayerNorms 2d per layer; embeddings LayerNorm d
    assert trainable(ROBERTA_BASE, "seq_cls", name="bitfit")[0] == 12 * 11 * 768 + 768 == 102_144  # Table 2: 0.1M


@pytest.mark.parametrize("shape", ["gpt2-medium", "roberta-base"])
def test_bitfit_subset_is_query_and_ffn_intermediate_biases(shape):
    arch, objective, L, d, f = SHAPES[shape]
    n, names = trainable(arch, objective, name="bitfit", bitfit_subset=True)
    assert n == L * (d + f)
    assert len(names) == 2 * L


# ---------------------------------------------------------------- adapters: |Θ| = L̂_Adpt(2dr + r + d) + 2 L̂_LN d
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("r", [1, 8])
def test_adapter_counts_are_the_paper_formula(shape, r):
    arch, objective, L, d, _ = SHAPES[shape]
    norm = d if shape == "llama-7b" else 2 * d  # RMSNorm has a weight only; LayerNorm weight and bias
    assert trainable(arch, objective, name="adapter_h", r=r)[0] == 2 * L * adapter(d, r) + 2 * L * norm
    assert trainable(arch, objective, name="adapter_l", r=r)[0] == L * adapter(d, r) + L * 2 * d  # its own LN
    assert trainable(arch, objective, name="adapter_p", r=r)[0] == L * adapter(d, r)
    assert trainable(arch, objective, name="adapter_d", r=r, adapter_drop=5)[0] == (L - 5) * adapter(d, r)


def test_adapter_l_reproduces_the_gpt2_medium_table_3_counts():
    assert trainable(GPT2_MEDIUM, "causal_lm", name="adapter_l", r=6)[0] == 368_784  # 0.37M
    assert trainable(GPT2_MEDIUM, "causal_lm", name="adapter_l", r=224)[0] == 11_089_152  # 11.09M


# ---------------------------------------------------------------- full, ft_top_k
@pytest.mark.parametrize("shape", list(SHAPES))
def test_full_is_every_base_parameter(shape):
    arch, objective, L, d, _ = SHAPES[shape]
    cfg = config_from_dict({"model": {"arch": arch, "objective": objective}})
    total = sum(p.numel() for n, p in build_meta(cfg.model).named_parameters() if not n.startswith("classifier."))
    assert trainable(arch, objective, name="full")[0] == total
    if shape == "gpt2-medium":  # wte + wpe + blocks + ln_f (lm_head is tied to wte)
        assert total == 50257 * d + 1024 * d + L * layer_params(shape) + 2 * d == 354_823_168


@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("k", [1, 2])
def test_ft_top_k_is_the_last_k_layers_and_the_final_norm(shape, k):
    arch, objective, L, d, _ = SHAPES[shape]
    final = {"gpt2-medium": 2 * d, "roberta-base": 0, "llama-7b": d}[shape]  # ln_f / none (post-LN) / norm
    n, names = trainable(arch, objective, name="ft_top_k", top_k=k)
    assert n == k * layer_params(shape) + final
    blocks = {int(m.group(1)) for x in names if (m := re.search(r"\.(?:h|layer|layers)\.(\d+)\.", x))}
    assert blocks == set(range(L - k, L))


def test_ft_top2_on_gpt2_medium_is_table_3():
    assert round(trainable(GPT2_MEDIUM, "causal_lm", name="ft_top_k", top_k=2)[0] / 1e6, 2) == 25.19


# ---------------------------------------------------------------- GPT-3 175B, in seconds
def test_gpt3_175b_counts_on_the_meta_device():
    L, d = 96, 12288
    assert trainable(GPT3, "causal_lm", name="bitfit")[0] == L * 11 * d + d == 12_988_416
    for r, paper in ((1, 7.1), (8, 40.1)):
        adapters = 2 * L * adapter(d, r)
        assert trainable(GPT3, "causal_lm", name="adapter_h", r=r)[0] == adapters + 2 * (2 * L) * d
        assert round(adapters / 1e6, 1) == paper  # the paper's Table 4/15 numbers leave the LayerNorm term out


def test_counts_table_script_prints_markdown():
    rows = [r for r in counts.ROWS if r[0] == "RoBERTa-base"]
    text = counts.table(rows)
    assert text.splitlines()[0].startswith("| model | method |")
    assert "| RoBERTa-base | bitfit |  | 102,144 (0.10M) | 0.1M | = |" in text


@pytest.mark.parametrize("fname,r,expected", [("gpt3-175b-bitfit.yaml", None, 12_988_416),
                                              ("gpt3-175b-adapter_h.yaml", None, 11_796_672),
                                              ("gpt3-175b-adapter_h.yaml", 8, 44_828_160)])
def test_gpt3_configs_build_and_count_on_the_meta_device(fname, r, expected):
    cfg = load_config(REPO / "configs" / fname, [f"method.r={r}"] if r else [])
    assert cfg.model.objective == "causal_lm" and cfg.model.arch == GPT3
    model = build_meta(cfg.model)
    methods.apply(model, cfg)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == expected
