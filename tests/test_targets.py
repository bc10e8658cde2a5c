"""Paper names resolve per architecture, counts equal the paper's formula 2 * L_hat * d_model * r."""
from __future__ import annotations

import pytest

from bigadapt import methods, targets
from bigadapt.config import config_from_dict
from bigadapt.errors import ConfigError
from bigadapt.model import build_meta

GPT2_MEDIUM = {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16}
ROBERTA_BASE = {"model_type": "roberta", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                "intermediate_size": 3072, "vocab_size": 50265}
OPT_350M = {"model_type": "opt", "num_hidden_layers": 24, "hidden_size": 1024, "num_attention_heads": 16,
            "ffn_dim": 4096, "word_embed_proj_dim": 512}
LLAMA_7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "intermediate_size": 11008}


def lora_count(arch, targets_, r, objective="causal_lm"):
    cfg = config_from_dict({"model": {"arch": arch, "objective": objective},
                            "method": {"r": r, "targets": targets_, "train_head": False}})
    model = build_meta(cfg.model)
    methods.apply(model, cfg)
    return sum(p.numel() for n, p in model.named_parameters() if p.requires_grad)


DEBERTA_XXL = {"model_type": "deberta-v2", "num_hidden_layers": 48, "hidden_size": 1536, "num_attention_heads": 24,
               "intermediate_size": 6144, "vocab_size": 128100}


@pytest.mark.parametrize("arch,layers,d,r", [(GPT2_MEDIUM, 24, 1024, 4), (ROBERTA_BASE, 12, 768, 8),
                                             (OPT_350M, 24, 1024, 8), (LLAMA_7B, 32, 4096, 8)])
def test_q_v_count_is_the_paper_formula(arch, layers, d, r):
    assert lora_count(arch, ["q", "v"], r) == 2 * (2 * layers) * d * r


def test_roberta_base_and_gpt2_medium_paper_values():
    assert lora_count(ROBERTA_BASE, ["q", "v"], 8, "seq_cls") == 294_912  # paper Table 2: 0.3M
    assert lora_count(GPT2_MEDIUM, ["q", "v"], 4) == 393_216  # lora-paper.md section 8
    assert lora_count(DEBERTA_XXL, ["q", "v"], 16, "seq_cls") == 4_718_592  # Table 2: 4.7M (released script r=16)


def test_all_four_attention_matrices_and_ffn():
    layers, d, ffn = 24, 1024, 4096
    assert lora_count(GPT2_MEDIUM, ["q", "k", "v", "o"], 1) == 2 * 4 * layers * d * 1
    # FFN matrices are d x 4d: A is r x in, B is out x r
    assert lora_count(GPT2_MEDIUM, ["ffn_in", "ffn_out"], 2) == layers * 2 * (d + ffn) * 2


def test_fused_gpt2_q_v_share_one_module():
    cfg = config_from_dict({"model": {"arch": GPT2_MEDIUM, "objective": "causal_lm"}})
    found = targets.resolve(build_meta(cfg.model), ["q", "v"])
    assert len(found) == 24 and all(t.slices == (0, 2) and t.n_parts == 3 for t in found)
    assert all(t.name.endswith("attn.c_attn") for t in found)


def test_llama_gate_and_patterns():
    cfg = config_from_dict({"model": {"arch": LLAMA_7B, "objective": "causal_lm"}})
    model = build_meta(cfg.model)
    assert len(targets.resolve(model, ["ffn_gate"])) == 32
    assert [t.name for t in targets.resolve(model, [r"model\.layers\.0\.self_attn\.q_proj"])] == \
        ["model.layers.0.self_attn.q_proj"]
    assert len(targets.resolve(model, ["o_proj"])) == 32  # suffix pattern


@pytest.mark.parametrize("spec,needle", [("ffn_gate", "gpt2 has no 'ffn_gate'"), ("nonexistent", "matches no module"),
                                         ("[", "not a valid module-name pattern")])
def test_bad_targets_are_one_line_errors(spec, needle):
    cfg = config_from_dict({"model": {"arch": GPT2_MEDIUM, "objective": "causal_lm"}})
    with pytest.raises(ConfigError, match="method.targets") as e:
        targets.resolve(build_meta(cfg.model), [spec])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_task_head_is_trainable_for_classification():
    cfg = config_from_dict({"model": {"arch": ROBERTA_BASE, "objective": "seq_cls", "num_labels": 3}})
    model = build_meta(cfg.model)
    names = methods.apply(model, cfg)
    assert targets.head_prefixes(model) == ["classifier"]
    assert any(n.startswith("classifier.") for n in names)
    assert all("lora_" in n or n.startswith("classifier.") for n in names)


def test_an_objective_the_architecture_lacks_is_one_line():
    cfg = config_from_dict({"model": {"arch": DEBERTA_XXL, "objective": "causal_lm"}})
    with pytest.raises(ConfigError, match="model.objective=causal_lm: deberta-v2 has no causal_lm head"):
        build_meta(cfg.model)
