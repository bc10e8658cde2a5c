"""LoRA (Hu et al. 2021): h = W0 x + (alpha/r) B A x, with A random, B zero, dropout on the LoRA input only.

One `LoRA` module wraps a frozen nn.Linear or GPT-2 Conv1D. On a fused projection (GPT-2 `c_attn` = [q|k|v])
only the enabled slices get a (B_i, A_i) pair; A stacks the enabled A_i as rows, B stacks the B_i.
The hot path never copies the base weight, skips dropout when p = 0, and multiplies (x A^T) B^T so the
wide product is never formed. Merging adds the same delta into the base weight explicitly (never as a
side effect of .eval()), one module at a time, gathered under ZeRO-3.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .. import targets as tg
from .. import zero
from ..errors import BigadaptError
from . import lora_branch


def _shape(base: nn.Module) -> tuple[int, int, bool]:
    """(in_features, out_features, fan_in_fan_out): Conv1D stores its weight as [in, out]."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, False
    if isinstance(base, tg._conv1d()):
        rows, cols = zero.full_shape(base.weight)
        return rows, cols, True
    raise BigadaptError(f"LoRA supports nn.Linear and GPT-2 Conv1D, not {type(base).__name__}")


class LoRA(nn.Module):
    def __init__(self, base: nn.Module, r: int, alpha: float, dropout: float = 0.0,
                 slices: tuple[int, ...] | None = None, n_parts: int = 1, rslora: bool = False):
        super().__init__()
        self.base_layer = base
        self.in_features, self.out_features, self.fan_in_fan_out = _shape(base)
        part = self.out_features // n_parts
        # [(start, stop)] of the base output that each (A_i, B_i) writes to
        self.spans = tuple((i * part, (i + 1) * part) for i in slices) if slices else ((0, self.out_features),)
        self.r, self.alpha, self.dropout = r, alpha, dropout
        self.scaling = alpha / (math.sqrt(r) if rslora else r)
        self.lora_A = nn.Parameter(torch.empty(len(self.spans) * r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(sum(b - a for a, b in self.spans), r))
        # as the authors' loralib: kaiming-uniform A, zero B, so training starts from the base model
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        h = F.dropout(x, self.dropout, self.training) if self.dropout and self.training else x
        return lora_branch.add(y, h.to(self.lora_A.dtype), self.lora_A, self.lora_B, self.scaling,
                               self.spans, self.r)

    def delta_weight(self) -> torch.Tensor:
        """scaling * B A laid out like the base weight ([out, in], or [in, out] for Conv1D), in fp32."""
        A, B = self.lora_A.float(), self.lora_B.float()
        full = torch.zeros(self.out_features, self.in_features, dtype=torch.float32, device=A.device)
        row = 0
        for i, (a, b) in enumerate(self.spans):
            full[a:b] = B[row:row + b - a] @ A[i * self.r:(i + 1) * self.r]
            row += b - a
        full *= self.scaling
        return full.T if self.fan_in_fan_out else full

    def merge(self, sign: float = 1.0) -> None:
        w = self.base_layer.weight
        with zero.gathered([w, self.lora_A, self.lora_B], modify=True) as writer:
            if writer:
                w.data += (sign * self.delta_weight()).to(w.dtype)
        self.merged = sign > 0

    def extra_repr(self) -> str:
        return f"r={self.r}, alpha={self.alpha}, spans={self.spans}, dropout={self.dropout}"


def inject(model: nn.Module, mcfg) -> list[str]:
    """Wrap every resolved target in a LoRA module; returns the wrapped module names."""
    found = tg.resolve(model, mcfg.targets)
    for t in found:
        lora = LoRA(t.module, mcfg.r, mcfg.alpha, mcfg.dropout, t.slices, t.n_parts, mcfg.rslora)
        _replace(model, t.name, lora)
    return [t.name for t in found]


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


def lora_modules(model: nn.Module) -> list[tuple[str, LoRA]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LoRA)]


def merge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        if not m.merged:
            m.merge(+1.0)


def unmerge(model: nn.Module) -> None:
    for _, m in lora_modules(model):
        if m.merged:
            m.merge(-1.0)


def unwrap(model: nn.Module) -> None:
    """Replace each (merged) LoRA wrapper by its base layer: a plain Hugging Face model again."""
    for name, m in lora_modules(model):
        if not m.merged:
            raise BigadaptError(f"{name}: merge before unwrapping, or the LoRA update would be dropped")
        _replace(model, name, m.base_layer)
