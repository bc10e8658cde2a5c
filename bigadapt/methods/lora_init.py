"""How a LoRA module's A and B start (`method.lora_init`), as peft's `init_lora_weights`.

- kaiming: the paper's (loralib): A kaiming-uniform, B = 0. Built by `LoRA.__init__`; nothing to do here.
- gaussian: A ~ N(0, 1/r^2) (std 1/r, peft's "gaussian"), B = 0.
- pissa (Meng et al. 2024): W0 = V S U^T; A = sqrt(S_r / s) U_r^T, B = V_r sqrt(S_r / s), and the base weight is
  replaced by its residual W0 - s B A, so the model computes W0 x at the start.
- olora (Büyükakyüz 2024): W0 = Q R; A = R[:r], B = Q[:, :r], base weight W0 - s B A.

s is the module's scaling (alpha/r, or alpha/sqrt(r) with rsLoRA). On a fused GPT-2 `c_attn` each enabled slice
(q, v) is its own [out/3, in] matrix and gets its own decomposition: the same as PiSSA/OLoRA on separate q and v
projections. Conv1D weights are decomposed in the [out, in] layout (peft transposes for PiSSA; peft's OLoRA does
not, and is only comparable on nn.Linear).

The residual design: the residual base is a pure function of (W0, r, alpha, rslora, init), so it is rebuilt, not
stored. Every build of a run's model (training, resume, eval, generate, merge, export) injects through here and
gets the same residual and the same initial A0, B0; the checkpoint keeps only the trained A, B, and its base
fingerprint refers to the original W0 it was computed from (what every command loads). Export to peft turns the
run back into a plain LoRA on the original base (bigadapt/export_init.py).

Under ZeRO-3 one module's W0 is gathered at a time, never the whole base; rank 0 decomposes it, its A0 and B0 are
sent to every rank (so all ranks start from the same bits whatever their LAPACK does), and the residual rank 0
writes is re-partitioned by DeepSpeed. On meta tensors (the accounting's build) there is nothing to compute.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import zero
from ..errors import ConfigError

INITS = ("kaiming", "gaussian", "pissa", "olora")
FROM_W0 = ("pissa", "olora")
FLOAT_BASES = (torch.float32, torch.bfloat16, torch.float16)


def init(lora: nn.Module, kind: str, name: str = "") -> None:
    """*Collective under ZeRO-3 for pissa/olora.* Set the module's A, B (and residual base) as `kind` says."""
    if kind not in INITS:
        raise ConfigError(f"method.lora_init={kind!r}: unknown; choose one of {', '.join(INITS)}")
    lora.init_kind = kind  # read by rebuild_residual, where a module was built on the meta device
    if kind == "kaiming":
        return
    if kind == "gaussian":
        if not lora.lora_A.is_meta:
            with torch.no_grad():
                nn.init.normal_(lora.lora_A, std=1 / lora.r)
        return
    w = lora.base_layer.weight
    if w.dtype not in FLOAT_BASES:
        raise ConfigError(f"method.lora_init={kind!r}: {name or 'a target'} has a {str(w.dtype)[6:]} (quantized) "
                          f"base weight; {kind} needs fp32/bf16/fp16 weights: initialise on an unquantized base, or "
                          f"use method.lora_init=kaiming")
    if w.is_meta:  # the accounting's build: shapes only
        return
    _from_w0(lora, kind)


def _from_w0(lora: nn.Module, kind: str) -> None:
    w = lora.base_layer.weight
    A0, B0 = None, None
    with torch.no_grad(), zero.gathered([w], modify=True) as writer:
        if zero.rank() == 0:  # one decomposition, sent to every rank: identical A0, B0 everywhere
            A0, B0 = decompose(_out_in(lora, w), lora, kind)
        A0, B0 = zero.all_gather_object((A0, B0))[0] if zero.world_size() > 1 else (A0, B0)
        if writer:
            w.data.copy_(_as_stored(lora, _out_in(lora, w) - lora.scaling * _full(lora, B0) @ A0, w.dtype))
    _set(lora.lora_A, A0)
    _set(lora.lora_B, B0)


def rebuild_residual(lora: nn.Module) -> None:
    """W0 -> W0 - s B0 A0 on a module whose base weight was just made real (not partitioned), its trained A and B
    untouched: the base a PiSSA/OLoRA module trained on, for a module built on the meta device (the streaming
    merge's skeleton, where `init` had no W0 to decompose). No-op for inits that leave W0 alone."""
    kind = getattr(lora, "init_kind", "kaiming")
    if kind not in FROM_W0:
        return
    w = lora.base_layer.weight
    A0, B0 = decompose(_out_in(lora, w), lora, kind)
    with torch.no_grad():
        w.data.copy_(_as_stored(lora, _out_in(lora, w) - lora.scaling * _full(lora, B0) @ A0, w.dtype))


def decompose(W: torch.Tensor, lora: nn.Module, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) in LoRA's stacked layout from W0 as [out, in] fp32: one decomposition per enabled slice."""
    r, s = lora.r, lora.scaling
    As, Bs = [], []
    for a, b in lora.spans:
        Wi = W[a:b]
        if kind == "pissa":
            V, S, Uh = torch.linalg.svd(Wi, full_matrices=False)
            Sr = S[:r] / s
            As.append(torch.diag(torch.sqrt(Sr)) @ Uh[:r])
            Bs.append(V[:, :r] @ torch.diag(torch.sqrt(Sr)))
        else:
            Q, R = torch.linalg.qr(Wi)
            As.append(R[:r])
            Bs.append(Q[:, :r])
    A0, B0 = torch.cat(As).contiguous(), torch.cat(Bs).contiguous()
    if A0.shape != (len(lora.spans) * r, lora.in_features) or B0.shape[1] != r:
        raise ConfigError(f"method.lora_init={kind!r}: r={r} exceeds the rank of a {tuple(Wi.shape)} weight; "
                          f"lower method.r to at most {min(Wi.shape)}")
    return A0, B0


def _out_in(lora: nn.Module, w: torch.Tensor) -> torch.Tensor:
    W = w.detach().float()
    return W.T if lora.fan_in_fan_out else W


def _as_stored(lora: nn.Module, W: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (W.T if lora.fan_in_fan_out else W).to(dtype)


def _full(lora: nn.Module, B: torch.Tensor) -> torch.Tensor:
    """B over the whole output ([out, k r]), zero outside each slice's rows: B_full @ A = the stacked delta."""
    full = torch.zeros(lora.out_features, B.shape[1] * len(lora.spans), dtype=B.dtype)
    row = 0
    for i, (a, b) in enumerate(lora.spans):
        full[a:b, i * lora.r:(i + 1) * lora.r] = B[row:row + b - a]
        row += b - a
    return full


def _set(p: torch.Tensor, value: torch.Tensor) -> None:
    if zero.is_zero(p):
        zero.set_param(p, value)
    else:
        with torch.no_grad():
            p.copy_(value.to(p.dtype))
