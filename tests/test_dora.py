"""DoRA against huggingface/peft's DoRA (use_dora=True) on the same base and the same A, B, m: forward (with and
without dropout), gradients and one optimizer step, merge, unmerge; on LLaMA's Linear and GPT-2's Conv1D, whole
and as q,v slices of the fused c_attn; export -> peft and `bigadapt merge` (streamed and in memory) on a run."""
from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from bigadapt import accounting, export
from bigadapt.config import MethodConfig, config_from_dict
from bigadapt.export import _full_B
from bigadapt.methods import lora
from bigadapt.methods.dora import DoRA

from .conftest import TINY_GPT2, TINY_LLAMA, tiny_config

# (arch, targets, rank_pattern, alpha_pattern): LLaMA Linear; GPT-2 Conv1D whole; GPT-2's fused c_attn q,v slices
CASES = {
    "llama-linear": (TINY_LLAMA, ["q", "v", "ffn_in"], {"up_proj": 2}, {"v_proj": 3}),
    "gpt2-conv1d": (TINY_GPT2, ["c_attn", "c_fc"], {"c_fc": 2}, {"c_attn": 16}),
    "gpt2-qv-slices": (TINY_GPT2, ["q", "v"], {}, {}),
}


def base_model(arch: dict) -> torch.nn.Module:
    arch = dict(arch)
    config = AutoConfig.for_model(arch.pop("model_type"), **arch)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).float()


def twins(case: str, dropout: float = 0.0, seed: int = 1):
    """(ours, peft's) DoRA over copies of one base, holding the same nonzero B and a magnitude off ||W0||."""
    from peft import LoraConfig, get_peft_model
    arch, targets, ranks, alphas = CASES[case]
    base = base_model(arch)
    theirs = copy.deepcopy(base)
    ours = base.requires_grad_(False)
    names = lora.inject(ours, MethodConfig(r=4, alpha=8, targets=targets, dora=True, dropout=dropout,
                                           rank_pattern=ranks, alpha_pattern=alphas))
    torch.manual_seed(seed)
    with torch.no_grad():
        for _, m in lora.lora_modules(ours):
            m.lora_B.normal_(0, 0.1)
            m.lora_magnitude_vector.mul_(1 + 0.2 * torch.randn_like(m.lora_magnitude_vector))
    mods = dict(lora.lora_modules(ours))
    # the export's layout: per-module rank and alpha by full name, B over the whole output
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=names, use_dora=True, lora_dropout=dropout,
                     fan_in_fan_out=arch["model_type"] == "gpt2",
                     rank_pattern={n: m.lora_A.shape[0] for n, m in mods.items()},
                     alpha_pattern={n: m.scaling * m.lora_A.shape[0] for n, m in mods.items()})
    theirs = get_peft_model(theirs, cfg)
    with torch.no_grad():
        for name, m in mods.items():
            layer = theirs.base_model.model.get_submodule(name)
            layer.lora_A["default"].weight.copy_(m.lora_A)
            layer.lora_B["default"].weight.copy_(_full_B(m))
            layer.lora_magnitude_vector["default"].weight.copy_(m.full_magnitude())
    return ours, theirs, mods


def inputs(vocab: int = 96):
    g = torch.Generator().manual_seed(3)
    return torch.randint(1, vocab, (3, 12), generator=g)


def peft_layer(theirs, name):
    return theirs.base_model.model.get_submodule(name)


def rows(m) -> torch.Tensor:
    """The whole-output rows that m's B (and magnitude) cover."""
    return torch.cat([torch.arange(a, b) for a, b in m.spans])


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a - b).abs().max().item()


@pytest.mark.parametrize("case", list(CASES))
def test_forward_gradients_and_step_equal_peft(case):
    ours, theirs, mods = twins(case)
    x = inputs()
    a, b = ours(x).logits, theirs(x).logits
    print(f"\n{case} forward max|diff| {max_diff(a, b):.2e}")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    g = torch.randn_like(a)
    (a * g).sum().backward()
    (b * g).sum().backward()
    grads = 0.0
    for name, m in mods.items():
        layer, r = peft_layer(theirs, name), rows(m)
        for mine, peft_grad in ((m.lora_A.grad, layer.lora_A["default"].weight.grad),
                                (m.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad[r])):
            grads = max(grads, max_diff(mine, peft_grad) / peft_grad.abs().max().item())
        torch.testing.assert_close(m.lora_A.grad, layer.lora_A["default"].weight.grad, rtol=1e-4, atol=1e-5)
        _check_B_grad(m, layer)
        torch.testing.assert_close(m.lora_magnitude_vector.grad, layer.lora_magnitude_vector["default"].weight.grad[r],
                                   rtol=1e-4, atol=1e-6)
    print(f"{case} gradients of A and m max|diff| / max|grad| {grads:.2e}")
    if any(len(m.spans) > 1 for m in mods.values()):
        return  # peft's whole-output B and m would train the disabled slice too: one step no longer compares
    ours_p = [p for p in ours.parameters() if p.requires_grad]
    theirs_p = [p for p in theirs.parameters() if p.requires_grad]
    for params in (ours_p, theirs_p):
        opt = torch.optim.AdamW(params, lr=1e-2)
        opt.step()
    with torch.no_grad():
        a, b = ours(x).logits, theirs(x).logits
    print(f"{case} after one AdamW step max|diff| {max_diff(a, b):.2e}")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def _check_B_grad(m, layer) -> None:
    """B's gradient on each enabled slice: the diagonal block of peft's whole-output B (all of it, unsliced)."""
    full = layer.lora_B["default"].weight.grad
    row = 0
    for i, (a, b) in enumerate(m.spans):
        torch.testing.assert_close(m.lora_B.grad[row:row + b - a], full[a:b, i * m.r:(i + 1) * m.r],
                                   rtol=1e-4, atol=1e-5)
        row += b - a


@pytest.mark.parametrize("case", ["llama-linear", "gpt2-qv-slices"])
def test_dropout_path_equals_peft(case):
    """With dropout peft recomputes W0 x' on the dropped input: the same masks (same seed, same order) give the
    same output."""
    ours, theirs, _ = twins(case, dropout=0.3)
    ours.train()
    theirs.train()
    x = inputs()
    torch.manual_seed(11)
    a = ours(x).logits
    torch.manual_seed(11)
    b = theirs(x).logits
    print(f"\n{case} dropout 0.3 forward max|diff| {max_diff(a, b):.2e}")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    ours.eval()
    with torch.no_grad():
        assert max_diff(ours(x).logits, a) > 1e-3  # dropout did act


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unmerge_restores(case):
    ours, theirs, mods = twins(case)
    x = inputs()
    with torch.no_grad():
        unmerged = ours(x).logits
        w0 = {n: m.base_layer.weight.detach().clone() for n, m in mods.items()}
        lora.merge(ours)
        merged = ours(x).logits
        plain = theirs.merge_and_unload()
        peft_merged = plain(x).logits
    print(f"\n{case} merged vs peft merge_and_unload max|diff| {max_diff(merged, peft_merged):.2e}")
    torch.testing.assert_close(merged, peft_merged, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged, unmerged, rtol=1e-5, atol=1e-5)
    for name, m in mods.items():
        torch.testing.assert_close(m.base_layer.weight, plain.get_submodule(name).weight, rtol=1e-5, atol=1e-6)
    lora.unmerge(ours)
    for name, m in mods.items():
        torch.testing.assert_close(m.base_layer.weight, w0[name], rtol=1e-5, atol=1e-6)
    with pytest.raises(Exception, match="unmerge needs the norm"):
        next(iter(mods.values())).merge(-1.0)


def test_starts_as_the_base_and_disabled_slice_is_untouched():
    base = base_model(TINY_GPT2)
    twin = copy.deepcopy(base)
    lora.inject(base.requires_grad_(False), MethodConfig(r=4, alpha=8, targets=["q", "v"], dora=True))
    x = inputs()
    with torch.no_grad():
        torch.testing.assert_close(base(x).logits, twin(x).logits)
        m = base.get_submodule("transformer.h.0.attn.c_attn")
        assert isinstance(m, DoRA) and m.lora_magnitude_vector.numel() == 2 * 64  # q and v rows only
        m.lora_B.normal_()
        m.lora_magnitude_vector.mul_(2)
        h = torch.randn(2, 5, 64)
        y, y0 = m(h), m.base_layer(h)
    assert torch.equal(y[..., 64:128], y0[..., 64:128])  # k: bit for bit the base's
    assert max_diff(y[..., :64], y0[..., :64]) > 1e-2


def test_meta_build_counts_the_magnitude_and_its_activation():
    """accounting.shapes builds on the meta device: DoRA adds exactly one trainable value per adapted output row,
    and the activations one [batch, seq, rows] tensor per adapted module."""
    def shape(method):
        cfg = config_from_dict(tiny_config("unused", TINY_LLAMA, method=method))
        return accounting.shapes(cfg)[0], cfg
    plain = {"name": "lora", "r": 4, "alpha": 8, "targets": ["q", "v"]}
    (ours, cfg), (base, _) = shape(dict(plain, dora=True)), shape(plain)
    trainable = [sum(n for name, n, t, _ in s.tensors if t and not name.startswith("score")) for s in (ours, base)]
    rows = 2 * (64 + 32)  # 2 layers x (q: 64 rows + v: 2 kv heads x 16)
    assert trainable[0] - trainable[1] == rows
    lay = accounting.Layout(micro_batch=2, seq_len=16)
    acts = [accounting.activations(s, cfg, lay)["activations"] for s in (ours, base)]
    extra = acts[0] - acts[1]
    assert extra == 2 * 16 * rows * 4  # fp32 activations


# ---------------------------------------------------------------- a trained run: export to peft, bigadapt merge
@pytest.mark.parametrize("arch,objective,targets", [("llama", "causal_lm", ["q", "v", "o"]),
                                                    ("gpt2", "seq_cls", ["q", "v"])])
def test_run_exports_to_peft_and_merges(tmp_path, capsys, arch, objective, targets):
    from peft import PeftModel
    from safetensors import safe_open

    from bigadapt.model import build_base

    from .test_merge_stream import tensors, train
    method = {"name": "lora", "r": 4, "alpha": 8, "targets": targets, "dora": True,
              "rank_pattern": {"v_proj" if arch == "llama" else "c_attn": 2}}
    run = train(tmp_path, arch, "fp32", objective, method)
    ours, manifest, cfg = export.load_trained(run)
    with safe_open(export.resolve_checkpoint(run) / "adapter.safetensors", "pt") as f:  # trained and saved
        assert sum(k.endswith("lora_magnitude_vector") for k in f.keys()) == len(lora.lora_modules(ours))
    x = inputs(ours.config.vocab_size)
    with torch.no_grad():
        expected = ours(x).logits
    export.to_peft(run, tmp_path / "peft")
    base = build_base(cfg.model, cfg.train.seed).eval()
    got = PeftModel.from_pretrained(base, tmp_path / "peft").eval()
    with torch.no_grad():
        logits = got(x).logits
    exported = max_diff(logits, expected)
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)
    export.merged(run, tmp_path / "stream")
    export.merged(run, tmp_path / "memory", stream=False)
    assert "streamed tensor by tensor" in capsys.readouterr().out
    mem, streamed = tensors(tmp_path / "memory"), tensors(tmp_path / "stream")
    assert all(torch.equal(streamed[n], t) for n, t in mem.items())  # the same wrapper code: bit for bit
    cls = type(ours)
    merged = cls.from_pretrained(tmp_path / "stream").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(x).logits, expected, rtol=1e-5, atol=1e-5)
        print(f"\n{arch} export -> peft max|diff| {exported:.2e}; merged (streamed) vs unmerged max|diff| "
              f"{max_diff(merged(x).logits, expected):.2e}")
