"""BitFit (Ben Zaken et al. 2021): train only the bias terms of the frozen base.

`bitfit` unfreezes every parameter of the base named `*bias`: the attention and FFN biases and the LayerNorm
biases (and any output-layer bias, e.g. RoBERTa's `lm_head.bias` for causal LM); a fresh task head is `apply`'s
business. `bitfit_subset: true` is the BitFit paper's subset: only the query biases b_q and the biases of the
FFN intermediate layer (d -> 4d, the paper's b_m2), the two kinds whose values change most in full BitFit.

The trained biases are base tensors, so a BitFit model is already "merged": nothing adds latency, and
`merge`/`unmerge` have nothing to fold. One exception: GPT-2 fuses q, k and v into `c_attn`, whose single bias
cannot be unfrozen for q alone; there the subset adds a zero-initialised `bitfit_bias` for the q slice
(`SliceBias`, d elements, exactly b_q), which `merge` folds into `c_attn.bias`.
"""
from __future__ import annotations

import torch
from torch import nn

from .. import targets as tg
from .. import zero
from ..errors import BigadaptError, ConfigError

SUBSET = ("q", "ffn_in")  # paper names of the BitFit subset: query and FFN-intermediate biases


class SliceBias(nn.Module):
    """A trainable bias for some equal slices of a fused projection's output, added after the frozen op."""

    def __init__(self, base: nn.Module, slices: tuple[int, ...], n_parts: int):
        super().__init__()
        self.base_layer = base
        part = zero.full_shape(base.bias)[0] // n_parts
        self.spans = [(i * part, (i + 1) * part) for i in slices]
        device = "meta" if base.bias.is_meta else None
        self.bitfit_bias = nn.Parameter(torch.zeros(len(slices) * part, device=device))
        self.merged = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base_layer(x)
        if self.merged:
            return y
        # a full-width bias added out of place: an in-place add into slices of the frozen output (a view under
        # Conv1D) makes autograd copy the whole output in backward (methods/lora_branch.py)
        full, row = y.new_zeros(y.shape[-1]), 0
        for a, b in self.spans:
            full[a:b] = self.bitfit_bias[row:row + b - a].to(y.dtype)
            row += b - a
        return y + full

    def merge(self, sign: float) -> None:
        bias = self.base_layer.bias
        with torch.no_grad(), zero.gathered([bias, self.bitfit_bias], modify=True) as writer:
            if writer:
                row = 0
                for a, b in self.spans:
                    bias.data[a:b] += (sign * self.bitfit_bias[row:row + b - a].float()).to(bias.dtype)
                    row += b - a
        self.merged = sign > 0


def inject(model: nn.Module, mcfg) -> list[str]:
    """Unfreeze the biases (all, or the subset); returns the trainable parameter names."""
    names = _subset(model) if mcfg.bitfit_subset else _all_biases(model)
    if not names:
        what = "no query or FFN-intermediate biases" if mcfg.bitfit_subset else "no bias terms"
        raise ConfigError(f"method.name=bitfit: {tg.model_type(model) or 'this model'} has {what}; "
                          f"choose lora or adapter_h")
    return names


def _in_head(name: str, heads: list[str]) -> bool:
    return any(name.startswith(h + ".") for h in heads)


def _all_biases(model: nn.Module) -> list[str]:
    heads = tg.head_prefixes(model)
    names = []
    for name, p in model.named_parameters():
        if name.rpartition(".")[2] == "bias" and not _in_head(name, heads):
            p.requires_grad_(True)
            names.append(name)
    return names


def _subset(model: nn.Module) -> list[str]:
    mtype = tg.model_type(model)
    # the subset is defined by paper names; without both (unmapped, a fused per-head qkv, an MoE FFN) there is none
    if not all(k in tg.ARCHS.get(mtype, {}) for k in SUBSET):
        raise ConfigError(f"method.bitfit_subset=true: needs the paper's q and ffn_in matrices, not mapped for "
                          f"{mtype!r}; use bitfit_subset=false")
    names = []
    for t in tg.resolve(model, list(SUBSET), key="method.bitfit_subset"):
        if getattr(t.module, "bias", None) is None:
            continue
        if t.slices is None:
            t.module.bias.requires_grad_(True)
            names.append(f"{t.name}.bias")
        else:
            _replace(model, t.name, SliceBias(t.module, t.slices, t.n_parts))
            names.append(f"{t.name}.bitfit_bias")
    return names


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def _slice_biases(model: nn.Module) -> list[SliceBias]:
    return [m for m in model.modules() if isinstance(m, SliceBias)]


def merge(model: nn.Module) -> None:
    """Nothing to fold for biases trained in place (they are base tensors); fused-slice biases are added in."""
    for m in _slice_biases(model):
        if not m.merged:
            m.merge(+1.0)


def unmerge(model: nn.Module) -> None:
    for m in _slice_biases(model):
        if m.merged:
            m.merge(-1.0)


def unwrap(model: nn.Module) -> None:
    """After merge: replace each SliceBias by its base layer, leaving a plain Hugging Face model."""
    for name, m in list(model.named_modules()):
        if isinstance(m, SliceBias):
            if not m.merged:
                raise BigadaptError(f"{name}: merge before unwrapping, or the trained q bias would be dropped")
            _replace(model, name, m.base_layer)
