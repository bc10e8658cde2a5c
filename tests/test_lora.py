"""LoRA against a plain-PyTorch reference: forward, gradients, merge/unmerge, fused slices, hot path."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from bigadapt.methods.lora import LoRA
from bigadapt.methods.lora_branch import LoRABranch


def reference(x, W, b, pieces, scaling):
    """y = x W^T + b + sum_i scaling * x A_i^T B_i^T placed at rows [a, b) of the output: written from the paper."""
    y = x @ W.T + b
    delta = torch.zeros_like(y)
    for (a, c), A, B in pieces:
        delta[..., a:c] = scaling * (x @ A.T @ B.T)
    return y + delta


def randomize(lora: LoRA) -> None:
    with torch.no_grad():
        lora.lora_B.normal_()  # B starts at zero; give it values so the delta is visible


def test_linear_forward_and_grads_match_reference():
    torch.manual_seed(0)
    base = nn.Linear(12, 10)
    lora = LoRA(base, r=3, alpha=6.0)
    randomize(lora)
    base.requires_grad_(False)
    x = torch.randn(2, 5, 12)
    y = lora(x)
    A, B = lora.lora_A.detach().clone().requires_grad_(), lora.lora_B.detach().clone().requires_grad_()
    ref = reference(x, base.weight, base.bias, [((0, 10), A, B)], 6.0 / 3)
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    (y * g).sum().backward()
    (ref * g).sum().backward()
    torch.testing.assert_close(lora.lora_A.grad, A.grad)
    torch.testing.assert_close(lora.lora_B.grad, B.grad)
    assert base.weight.grad is None and base.bias.grad is None  # gradients reach only A and B


def test_starts_as_the_base_model():
    base = nn.Linear(8, 8)
    x = torch.randn(3, 8)
    torch.testing.assert_close(LoRA(base, r=2, alpha=2.0)(x), base(x))


def test_conv1d_matches_reference():
    torch.manual_seed(1)
    base = Conv1D(10, 6)  # GPT-2 layout: weight [in=6, out=10]
    lora = LoRA(base, r=2, alpha=4.0)
    randomize(lora)
    x = torch.randn(4, 6)
    ref = reference(x, base.weight.T, base.bias, [((0, 10), lora.lora_A, lora.lora_B)], 2.0)
    torch.testing.assert_close(lora(x), ref)


def test_fused_qkv_only_enabled_slices_change():
    torch.manual_seed(2)
    d = 8
    base = Conv1D(3 * d, d)  # c_attn: [q | k | v]
    lora = LoRA(base, r=2, alpha=2.0, slices=(0, 2), n_parts=3)  # q and v, as the paper's GPT-2 runs
    randomize(lora)
    assert lora.lora_A.shape == (4, d) and lora.lora_B.shape == (2 * d, 2)
    x = torch.randn(3, d)
    A, B = lora.lora_A, lora.lora_B
    ref = reference(x, base.weight.T, base.bias, [((0, d), A[:2], B[:d]), ((2 * d, 3 * d), A[2:], B[d:])], 1.0)
    y = lora(x)
    torch.testing.assert_close(y, ref)
    torch.testing.assert_close(y[:, d:2 * d], base(x)[:, d:2 * d])  # k untouched
    y.sum().backward()
    assert lora.lora_A.grad is not None and lora.lora_B.grad is not None


@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused"])
def test_merge_then_unmerge(kind):
    torch.manual_seed(3)
    base = {"linear": lambda: nn.Linear(8, 12), "conv1d": lambda: Conv1D(12, 8), "fused": lambda: Conv1D(24, 8)}[kind]()
    lora = LoRA(base, r=2, alpha=4.0, **({"slices": (0, 2), "n_parts": 3} if kind == "fused" else {}))
    randomize(lora)
    x = torch.randn(5, 8)
    before = lora(x).detach()
    w0 = base.weight.detach().clone()
    lora.merge()
    assert lora.merged
    torch.testing.assert_close(lora(x), before, rtol=1e-5, atol=1e-5)  # merged == unmerged
    torch.testing.assert_close(base(x), before, rtol=1e-5, atol=1e-5)  # the delta is in the base weight now
    lora.merge(-1.0)
    assert not lora.merged
    torch.testing.assert_close(base.weight, w0, rtol=0, atol=1e-6)
    torch.testing.assert_close(lora(x), before, rtol=1e-5, atol=1e-5)


def test_bf16_base_with_fp32_lora():
    base = nn.Linear(8, 8).to(torch.bfloat16)
    lora = LoRA(base, r=2, alpha=2.0)
    randomize(lora)
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    y = lora(x)
    assert y.dtype == torch.bfloat16 and lora.lora_A.dtype == torch.float32
    ref = reference(x.float(), base.weight.float(), base.bias.float(), [((0, 8), lora.lora_A, lora.lora_B)], 1.0)
    torch.testing.assert_close(y.float(), ref, rtol=2e-2, atol=2e-2)


def test_dropout_applies_to_lora_input_only():
    torch.manual_seed(4)
    base = nn.Linear(16, 16)
    lora = LoRA(base, r=4, alpha=4.0, dropout=0.5)
    randomize(lora)
    x = torch.randn(64, 16)
    lora.eval()
    torch.testing.assert_close(lora(x), reference(x, base.weight, base.bias, [((0, 16), lora.lora_A, lora.lora_B)],
                                                 1.0))
    lora.train()
    torch.manual_seed(5)
    y = lora(x)
    torch.manual_seed(5)
    xd = torch.nn.functional.dropout(x, 0.5, True)
    torch.testing.assert_close(y, base(x) + 1.0 * (xd @ lora.lora_A.T @ lora.lora_B.T))


def test_no_dropout_call_when_p_is_zero(monkeypatch):
    lora = LoRA(nn.Linear(4, 4), r=1, alpha=1.0, dropout=0.0)
    called = []
    monkeypatch.setattr(torch.nn.functional, "dropout", lambda *a, **k: called.append(1))
    lora.train()(torch.randn(2, 4))
    assert not called


def test_rslora_scaling():
    assert LoRA(nn.Linear(4, 4), r=16, alpha=8.0, rslora=True).scaling == pytest.approx(8.0 / math.sqrt(16))
    assert LoRA(nn.Linear(4, 4), r=16, alpha=8.0).scaling == pytest.approx(0.5)


# the branch's backward is written out (lora_branch.py): check it against autograd's own, everywhere it is used
SPANS = {"whole": ((0, 12),), "q,v of qkv": ((0, 4), (8, 12)), "k": ((4, 8),)}


@pytest.mark.parametrize("spans", SPANS.values(), ids=SPANS.keys())
def test_branch_gradcheck(spans):
    torch.manual_seed(6)
    r = 2
    y = torch.randn(3, 5, 12, dtype=torch.float64, requires_grad=True)
    x = torch.randn(3, 5, 7, dtype=torch.float64, requires_grad=True)
    A = torch.randn(len(spans) * r, 7, dtype=torch.float64, requires_grad=True)
    B = torch.randn(sum(b - a for a, b in spans), r, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda *t: LoRABranch.apply(*t, 0.7, spans, r), (y, x, A, B))


@pytest.mark.parametrize("kind", ["linear", "conv1d", "fused"])
def test_module_gradients_match_reference(kind):
    """A, B and the input's gradient through base + LoRA, against the paper's formula under plain autograd."""
    torch.manual_seed(7)
    d = 6
    base = {"linear": lambda: nn.Linear(d, 3 * d), "conv1d": lambda: Conv1D(3 * d, d),
            "fused": lambda: Conv1D(3 * d, d)}[kind]().requires_grad_(False)
    lora = LoRA(base, r=2, alpha=3.0, **({"slices": (0, 2), "n_parts": 3} if kind == "fused" else {}))
    randomize(lora)
    x = torch.randn(2, 4, d, requires_grad=True)
    A, B = lora.lora_A.detach().clone().requires_grad_(), lora.lora_B.detach().clone().requires_grad_()
    xr = x.detach().clone().requires_grad_()
    W = base.weight.T if kind != "linear" else base.weight
    pieces = ([((0, d), A[:2], B[:d]), ((2 * d, 3 * d), A[2:], B[d:])] if kind == "fused"
              else [((0, 3 * d), A, B)])
    g = torch.randn(2, 4, 3 * d)
    (lora(x) * g).sum().backward()
    (reference(xr, W, base.bias, pieces, 1.5) * g).sum().backward()
    torch.testing.assert_close(lora.lora_A.grad, A.grad)
    torch.testing.assert_close(lora.lora_B.grad, B.grad)
    torch.testing.assert_close(x.grad, xr.grad)


def test_bf16_base_gradients_reach_fp32_lora():
    torch.manual_seed(8)
    base = nn.Linear(8, 8).to(torch.bfloat16).requires_grad_(False)
    lora = LoRA(base, r=2, alpha=2.0)
    randomize(lora)
    x = torch.randn(4, 8, dtype=torch.bfloat16)
    lora(x).float().sum().backward()
    A, B = lora.lora_A.detach().clone().requires_grad_(), lora.lora_B.detach().clone().requires_grad_()
    reference(x.float(), base.weight.float(), base.bias.float(), [((0, 8), A, B)], 1.0).sum().backward()
    assert lora.lora_A.grad.dtype == torch.float32
    torch.testing.assert_close(lora.lora_A.grad, A.grad, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lora.lora_B.grad, B.grad, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("mode", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("kind", ["linear", "fused", "bf16"])
def test_evaluation_path_equals_training_path(kind, mode):
    """With nothing to record the branch writes into the frozen output in place: the same numbers."""
    torch.manual_seed(9)
    d = 8
    base = {"linear": lambda: nn.Linear(d, 3 * d), "fused": lambda: Conv1D(3 * d, d),
            "bf16": lambda: Conv1D(3 * d, d).to(torch.bfloat16)}[kind]()
    lora = LoRA(base, r=2, alpha=2.0, **({"slices": (0, 2), "n_parts": 3} if kind != "linear" else {}))
    randomize(lora)
    x = torch.randn(3, 5, d, dtype=base.weight.dtype)
    trained = lora(x)
    assert trained.grad_fn is not None
    with mode():
        evaluated = lora(x)
    torch.testing.assert_close(evaluated, trained.detach(), rtol=0, atol=0)
