"""PreEmbed / PreLayer (and with LoRA) against hand-built references on plain Hugging Face models: counts,
outputs, padding, pooling, gradients, KV-cache generation. CPU, plain PyTorch, seconds."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from bigadapt import methods
from bigadapt import model as base_model
from bigadapt.config import config_from_dict, load_config
from bigadapt.errors import BigadaptError, ConfigError
from bigadapt.methods import lora_prefix, prefix

from ..conftest import REPO, TINY_GPT2, TINY_LLAMA

TINY_BERT = {"model_type": "bert", "num_hidden_layers": 2, "hidden_size": 64, "num_attention_heads": 4,
             "intermediate_size": 128, "vocab_size": 96, "max_position_embeddings": 64, "hidden_dropout_prob": 0.0,
             "attention_probs_dropout_prob": 0.0, "pad_token_id": 0}
TINY_ROBERTA = dict(TINY_BERT, model_type="roberta", pad_token_id=1, max_position_embeddings=80, type_vocab_size=1)
ARCHS = {"gpt2": TINY_GPT2, "llama": TINY_LLAMA, "bert": TINY_BERT, "roberta": TINY_ROBERTA}
L_P, L_I = 3, 2


def run_cfg(name="pre_embed", arch="gpt2", objective="causal_lm", l_p=L_P, l_i=L_I, dtype="fp32", **method):
    arch = ARCHS[arch] if isinstance(arch, str) else arch
    return config_from_dict({"model": {"arch": dict(arch), "objective": objective, "dtype": dtype},
                             "method": {"name": name, "l_p": l_p, "l_i": l_i, "r": 4, "alpha": 8, **method},
                             "data": {"task": "synthetic_lm" if objective == "causal_lm" else "synthetic_cls"}})


def build(name="pre_embed", arch="gpt2", objective="causal_lm", **kw):
    """(plain base, the same base with the method injected and its tables randomised), both in eval mode."""
    cfg = run_cfg(name, arch, objective, **kw)
    plain = base_model.build_base(cfg.model, seed=0).eval()
    model = copy.deepcopy(plain)
    torch.manual_seed(1)
    methods.apply(model, cfg)
    with torch.no_grad():
        for p in model.prefix_tuning.parameters():
            p.normal_(0, 0.5)  # visible effect (the init copies small token embeddings)
    return plain, model.eval()


def ids(b=2, t=7, vocab=96):
    return torch.randint(2, vocab, (b, t), generator=torch.Generator().manual_seed(3))


def spliced(plain, x_ids, table, k=None):
    """[prefix, token embeddings, infix] (infix after the first k tokens): the reference's inputs_embeds."""
    k = x_ids.shape[1] if k is None else k
    e = plain.get_input_embeddings()(x_ids)
    rows = table.detach().to(e.dtype).expand(e.shape[0], -1, -1)
    return torch.cat([rows[:, :L_P], e[:, :k], rows[:, L_P:], e[:, k:]], 1)


def original_slots(t, k=None, causal=True):
    """Slots of the original tokens in [prefix, x[:k], infix, x[k:]]; the token before the infix reads the last
    infix slot in a causal model."""
    k = t if k is None else k
    slots = [L_P + j if j < k else L_P + L_I + j for j in range(t)]
    if causal and k:
        slots[k - 1] = L_P + k + L_I - 1
    return slots


# ---------------------------------------------------------------- counts: the paper's formulas
GPT2_M = {"model_type": "gpt2", "n_layer": 24, "n_embd": 1024, "n_head": 16, "vocab_size": 50257, "n_positions": 1024}
ROBERTA_BASE = {"model_type": "roberta", "num_hidden_layers": 12, "hidden_size": 768, "num_attention_heads": 12,
                "intermediate_size": 3072, "vocab_size": 50265, "max_position_embeddings": 514, "type_vocab_size": 1,
                "pad_token_id": 1}
LLAMA_7B = {"model_type": "llama", "num_hidden_layers": 32, "hidden_size": 4096, "num_attention_heads": 32,
            "intermediate_size": 11008, "vocab_size": 32000}


def trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


@pytest.mark.parametrize("arch,objective,L,d", [(GPT2_M, "causal_lm", 24, 1024), (ROBERTA_BASE, "seq_cls", 12, 768),
                                                (LLAMA_7B, "causal_lm", 32, 4096)])
@pytest.mark.parametrize("name", ["pre_embed", "pre_layer", "lora+pe", "lora+pl"])
def test_counts_equal_the_papers_formulas(arch, objective, L, d, name):
    l_p, l_i, r = 16, 8, 8
    cfg = run_cfg(name, arch, objective, l_p=l_p, l_i=l_i, r=r, targets=["q", "v"], train_head=False)
    model = base_model.build_meta(cfg.model)
    methods.apply(model, cfg)
    pre = d * (l_p + l_i) * (L if name in ("pre_layer", "lora+pl") else 1)  # §5.1: PreEmbed, PreLayer
    lora = 2 * (2 * L) * d * r if name.startswith("lora") else 0  # 2 × L̂_LoRA × d × r, W_q and W_v
    assert trainable(model) == pre + lora
    assert all(p.dtype == torch.float32 for p in model.prefix_tuning.parameters())


@pytest.mark.parametrize("config,expected", [("pre_embed", 3_244_032),  # 12288 × (256 + 8): the paper's 3.2M
                                             ("pre_layer", 18_874_368),  # 96 × 12288 × (8 + 8); paper 20.2M
                                             ("lora_pe", 37_896_192)])  # 37,748,736 + 12288 × 12; paper 37.8M
def test_gpt3_175b_configs_count_exactly_on_the_meta_device(config, expected):
    cfg = load_config(REPO / "configs" / f"gpt3-175b-{config}.yaml")
    model = base_model.build_meta(cfg.model)
    methods.apply(model, cfg)
    assert trainable(model) == expected


# ---------------------------------------------------------------- outputs against references
@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert", "roberta"])
def test_pre_embed_equals_the_plain_model_on_spliced_embeddings(arch):
    objective = "seq_cls" if arch in ("bert", "roberta") else "causal_lm"
    plain, model = build("pre_embed", arch, objective)
    x = ids()
    got = model.base_model(input_ids=x).last_hidden_state
    ref = plain.base_model(inputs_embeds=spliced(plain, x, model.prefix_tuning.embedding.weight)).last_hidden_state
    assert got.shape == (2, 7, 64)  # the original positions only
    torch.testing.assert_close(got, ref[:, original_slots(7, causal=objective == "causal_lm")])


def test_pre_embed_causal_lm_logits_and_infix_at():
    plain, model = build("pre_embed", "gpt2")
    x, table = ids(), model.prefix_tuning.embedding.weight
    for k in (None, 4):  # infix after the input, and between a "prompt" of 4 tokens and the rest
        got = model(input_ids=x, **({} if k is None else {"infix_at": k})).logits
        ref = plain(inputs_embeds=spliced(plain, x, table, k)).logits
        assert got.shape == (2, 7, 96)
        torch.testing.assert_close(got, ref[:, original_slots(7, k)])


@pytest.mark.parametrize("arch", ["gpt2", "llama", "bert"])
@pytest.mark.parametrize("name", ["pre_embed", "pre_layer"])
def test_padding_changes_nothing_at_real_positions(arch, name):
    objective = "seq_cls" if arch == "bert" else "causal_lm"
    _, model = build(name, arch, objective)
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 4:] = 0
    x = x.masked_fill(mask == 0, 0)
    padded = model.base_model(input_ids=x, attention_mask=mask).last_hidden_state
    alone = model.base_model(input_ids=x[1:, :4]).last_hidden_state
    torch.testing.assert_close(padded[1, :4], alone[0], rtol=1e-5, atol=1e-5)


def test_pre_layer_matches_a_block_by_block_reference():
    plain, model = build("pre_layer", "gpt2")
    x = ids(1, 6)
    embed, after0 = model.prefix_tuning.embedding.weight, model.prefix_tuning.after_layer[0].weight
    assert len(model.prefix_tuning.after_layer) == 1  # L = 2 tables: the first layer's input, block 0's output
    t = plain.transformer
    h = spliced(plain, x, embed)
    n = h.shape[1]
    h = h + t.wpe(torch.arange(n))
    causal = torch.full((n, n), float("-inf")).triu(1)[None, None]
    virtual = [i for i in range(n) if i < L_P or i >= n - L_I]
    h = t.h[0](h, None, causal)
    h = h.clone()
    h[:, virtual] = after0.detach()  # "the activations computed from previous layers are simply replaced"
    h = t.ln_f(t.h[1](h, None, causal))
    ref = plain.lm_head(h)[:, original_slots(6)]
    torch.testing.assert_close(model(input_ids=x).logits, ref)


# ---------------------------------------------------------------- classification heads
def test_gpt2_seq_cls_head_reads_the_infix_after_the_last_real_token():
    plain, model = build("pre_embed", "gpt2", "seq_cls")
    x = ids()
    mask = torch.ones_like(x)
    mask[1, 5:] = 0
    x = x.masked_fill(mask == 0, 0)
    got = model(input_ids=x, attention_mask=mask).logits
    table = model.prefix_tuning.embedding.weight
    for row, n in ((0, 7), (1, 5)):
        h = plain.transformer(inputs_embeds=spliced(plain, x[row:row + 1, :n], table)).last_hidden_state
        torch.testing.assert_close(got[row], plain.score(h[0, -1]))  # the last infix slot


@pytest.mark.parametrize("arch", ["bert", "roberta"])
def test_encoder_seq_cls_pools_the_first_real_token_not_the_prefix(arch):
    plain, model = build("pre_embed", arch, "seq_cls")
    x = ids()
    types = {}
    if arch == "bert":  # a sentence pair: virtual tokens take their neighbour's type
        tt = torch.tensor([[0, 0, 0, 0, 1, 1, 1]] * 2)
        types = {"token_type_ids": torch.cat([tt[:, :1].expand(-1, L_P), tt, tt[:, -1:].expand(-1, L_I)], 1)}
    got = model(input_ids=x, **({"token_type_ids": tt} if types else {})).logits
    body = plain.base_model
    h = body(inputs_embeds=spliced(plain, x, model.prefix_tuning.embedding.weight), **types).last_hidden_state
    if arch == "bert":  # pooler on [CLS], then the classifier
        ref = plain.classifier(body.pooler(h[:, L_P:]))
    else:  # RoBERTa's head reads <s> itself
        ref = plain.classifier(h[:, L_P:])
    torch.testing.assert_close(got, ref)


# ---------------------------------------------------------------- training
@pytest.mark.parametrize("name", ["pre_layer", "lora+pl"])
def test_gradients_reach_only_the_method_params(name):
    _, model = build(name, "gpt2")
    model.train()
    # infix mid-sequence: the first layer's infix input then feeds block 0's keys/values for later tokens (at the
    # end, block 0's output there is overwritten and nothing causal reads it: those l_i rows get no gradient)
    model(input_ids=ids(), infix_at=4).logits.square().mean().backward()
    for n, p in model.named_parameters():
        assert (p.grad is not None) == p.requires_grad, n  # LoRA's A has a zero gradient at B = 0, but one
    for table in [model.prefix_tuning.embedding, *model.prefix_tuning.after_layer]:
        assert table.weight.grad[:L_P].abs().sum() > 0 and table.weight.grad[L_P:].abs().sum() > 0  # both kinds


def test_pre_layer_infix_at_the_end_trains_only_the_last_tables_infix_rows():
    _, model = build("pre_layer", "gpt2")  # documented in docs/methods-prefix.md
    model(input_ids=ids()).logits.square().mean().backward()
    embed, last = model.prefix_tuning.embedding.weight.grad, model.prefix_tuning.after_layer[-1].weight.grad
    assert embed[:L_P].abs().sum() > 0 and embed[L_P:].abs().sum() == 0
    assert last[L_P:].abs().sum() > 0


@pytest.mark.parametrize("arch", ["bert", "gpt2"])
def test_a_step_changes_only_the_method_and_the_head(arch):
    _, model = build("pre_layer", arch, "seq_cls")
    model.train()
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert all(n.startswith(("prefix_tuning.", "classifier.", "score.")) for n in before)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    x = ids()
    F.cross_entropy(model(input_ids=x).logits, torch.tensor([0, 1])).backward()
    opt.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
        else:
            assert not torch.equal(p, before[n]), n


def test_fp32_tables_on_a_bf16_base():
    _, model = build("pre_layer", "llama", dtype="bf16")
    assert model.model.embed_tokens.weight.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in model.prefix_tuning.parameters())
    model(input_ids=ids()).logits.float().sum().backward()
    assert model.prefix_tuning.embedding.weight.grad.dtype == torch.float32


# ---------------------------------------------------------------- generation with the KV cache
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("name", ["pre_embed", "pre_layer", "lora+pl"])
def test_cached_generation_equals_uncached_greedy(arch, name):
    _, model = build(name, arch)
    prompt = ids(1, 5)
    cached = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0)
    seq = prompt  # uncached: the whole sequence each step, the infix kept after the prompt
    for _ in range(8):
        nxt = model(input_ids=seq, infix_at=prompt.shape[1], use_cache=False).logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(cached, seq)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_generate_without_infix_same_with_and_without_cache(arch):
    _, model = build("pre_layer", arch, l_i=0)
    prompt = ids(1, 5)
    kw = {"max_new_tokens": 8, "do_sample": False, "pad_token_id": 0}
    assert torch.equal(model.generate(prompt, use_cache=True, **kw), model.generate(prompt, use_cache=False, **kw))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_left_padded_batch_generates_what_each_prompt_does_alone(arch):
    _, model = build("pre_embed", arch)
    a, b = ids(1, 6)[0], ids(1, 3)[0] + 1
    batch = torch.stack([a, torch.cat([torch.zeros(3, dtype=torch.long), b])])
    mask = (torch.arange(6) >= torch.tensor([[0], [3]])).long()
    kw = {"max_new_tokens": 6, "do_sample": False, "pad_token_id": 0}
    out = model.generate(batch, attention_mask=mask, **kw)
    for row, prompt in ((0, a), (1, b)):
        alone = model.generate(prompt[None], **kw)[0, len(prompt):]  # may stop early at eos (= pad = 0)
        assert torch.equal(out[row, 6:6 + len(alone)], alone)


# ---------------------------------------------------------------- config and merge
def test_no_virtual_tokens_is_a_config_error_naming_l_p():
    for name in ("pre_embed", "lora+pl"):
        with pytest.raises(ConfigError, match="method.l_p"):
            run_cfg(name, l_p=0, l_i=0)


def test_merge_is_refused_with_the_reason():
    _, model = build("pre_embed")
    with pytest.raises(BigadaptError, match="lengthen"):
        prefix.merge(model)
    with pytest.raises(BigadaptError, match="LoRA part could"):
        lora_prefix.merge(model)
