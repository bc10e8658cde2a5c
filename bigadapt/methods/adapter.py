"""Bottleneck adapters, the LoRA paper's baselines AdapterH, AdapterL, AdapterP and AdapterDrop (§5.1).

One adapter maps a sublayer's output h to  h + W_up act(W_down h + b_down) + b_up  (d -> r -> d, r = `method.r`,
2dr + r + d parameters). W_up and b_up start at zero, so an adapted model starts exactly as its base.
It is placed by wrapping the module at the paper name `o` (attention output projection) or `ffn_out` (FFN
output projection), so it acts on the sublayer's output before the block's residual add, in every
architecture of `targets.py` (in an MoE model, whose experts are no Linear layers, `ffn_out` is the whole MoE
block's output: `targets.ADAPTER_SITES`). Falcon and Phi run attention and FFN in parallel from one norm per
block, so AdapterH trains that one there. Variants, by `method.name`:

- `adapter_h` (Houlsby et al. 2019): adapters after `o` and after `ffn_out` of every layer (tanh-GELU, as in
  their released adapter-bert), and the base's LayerNorms inside every block are trained too: two per layer, so
  |Θ| = L̂_Adpt(2dr + r + d) + 2·L̂_LN·d with L̂_Adpt = L̂_LN = 2L (RMSNorm has no bias: L̂_LN·d there).
  Differences: Houlsby inits W_down and W_up near zero (truncated normal, std 1e-3 in adapter-bert), here
  W_up = 0 exactly; their adapter follows the sublayer's dropout, ours precedes it (no difference when dropout
  is 0); in pre-LN models (GPT-2, OPT, LLaMA) the trained norms sit before the sublayers rather than after the
  adapters as in BERT; the final norm (ln_f) is not trained.
- `adapter_l` (Lin et al. 2020): one adapter per layer with its own LayerNorm on the adapter input,
  h + W_up ReLU(W_down LN(h)): |Θ| = L(2dr + r + d) + 2Ld. Lin et al. put it on the whole block output (after
  the FFN residual add); here it acts on the FFN output before that add (same count, different input).
- `adapter_p` (Pfeiffer et al. 2021): one adapter per layer after `ffn_out`, ReLU, no LayerNorm trained:
  |Θ| = L(2dr + r + d). Pfeiffer's adapter reads the FFN block's output after its add & LayerNorm and adds
  the pre-norm residual; here it reads the FFN sublayer output (same count).
- `adapter_d` (Rücklé et al. 2020, AdapterDrop): `adapter_p` with no adapter in the lowest `method.adapter_drop`
  layers (the static variant; their robust variant, which drops random layers per batch, is not implemented).

Adapters cannot be merged: the nonlinearity (and AdapterL's LayerNorm) is no linear map, so no base
weight can absorb it, and the extra sequential layers are the latency the LoRA paper measures (Table 1).
"""
from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .. import targets as tg
from ..errors import BigadaptError, ConfigError


@dataclass(frozen=True)
class Variant:
    where: tuple[str, ...]  # paper names of the sublayer outputs that get an adapter
    act: Callable[[], nn.Module]
    adapter_ln: bool  # a new LayerNorm on the adapter input (AdapterL)
    train_block_norms: bool  # unfreeze the base's norms inside each adapted block (AdapterH)


GELU_TANH = partial(nn.GELU, approximate="tanh")  # adapter-bert's gelu
VARIANTS = {
    "adapter_h": Variant(("o", "ffn_out"), GELU_TANH, adapter_ln=False, train_block_norms=True),
    "adapter_l": Variant(("ffn_out",), nn.ReLU, adapter_ln=True, train_block_norms=False),
    "adapter_p": Variant(("ffn_out",), nn.ReLU, adapter_ln=False, train_block_norms=False),
    "adapter_d": Variant(("ffn_out",), nn.ReLU, adapter_ln=False, train_block_norms=False),
}


class Adapter(nn.Module):
    """The wrapped sublayer followed by a residual bottleneck: h + up(act(down(LN?(h))))."""

    def __init__(self, base: nn.Module, r: int, act: Callable[[], nn.Module], adapter_ln: bool, variant: str,
                 d: int | None = None):
        super().__init__()
        self.base_layer = base
        self.variant = variant
        d = d or _out_features(base)  # d: the output width of a wrapped sublayer that is no Linear (an MoE block)
        device = "meta" if next(base.parameters()).is_meta else None  # meta model: count without allocating
        self.adapter_ln = nn.LayerNorm(d, device=device) if adapter_ln else None
        self.adapter_down = nn.Linear(d, r, device=device)  # default (Kaiming-uniform) init
        self.adapter_act = act()
        self.adapter_up = nn.Linear(r, d, device=device)
        nn.init.zeros_(self.adapter_up.weight)  # the adapter starts as the identity
        nn.init.zeros_(self.adapter_up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.base_layer(x)
        z = h.to(self.adapter_down.weight.dtype)  # fp32 adapter on a bf16/fp16 base
        if self.adapter_ln is not None:
            z = self.adapter_ln(z)
        return h + self.adapter_up(self.adapter_act(self.adapter_down(z))).to(h.dtype)

    def extra_repr(self) -> str:
        return f"variant={self.variant}"


def _out_features(base: nn.Module) -> int:
    if isinstance(base, nn.Linear):
        return base.out_features
    if isinstance(base, tg._conv1d()):
        return base.nf
    raise BigadaptError(f"adapters wrap nn.Linear or GPT-2 Conv1D, not {type(base).__name__}")


def validate(mcfg) -> None:
    if mcfg.r <= 0:
        raise ConfigError(f"method.r={mcfg.r!r}: the adapter bottleneck size must be a positive integer")
    if mcfg.adapter_drop and mcfg.name != "adapter_d":
        raise ConfigError(f"method.adapter_drop={mcfg.adapter_drop!r}: only adapter_d drops adapters; "
                          f"set method.name=adapter_d or method.adapter_drop=0")


def inject(model: nn.Module, mcfg) -> list[str]:
    """Wrap `o`/`ffn_out` of the adapted layers; returns the wrapped module and trained norm names."""
    validate(mcfg)
    variant = VARIANTS[mcfg.name]
    layers_name, layers = tg.layer_list(model)
    lowest = mcfg.adapter_drop if mcfg.name == "adapter_d" else 0
    if lowest >= len(layers):
        raise ConfigError(f"method.adapter_drop={lowest}: this {tg.model_type(model)} has {len(layers)} layers, "
                          f"so no adapter would remain; choose 0..{len(layers) - 1}")
    wrapped = []
    for t in tg.adapter_sites(model, list(variant.where), key=f"method.name={mcfg.name}"):
        if _layer_index(t.name, layers_name) >= lowest:
            d = None if tg._is_linear(t.module) else model.config.hidden_size  # an MoE block maps d -> d
            _replace(model, t.name, Adapter(t.module, mcfg.r, variant.act, variant.adapter_ln, mcfg.name, d))
            wrapped.append(t.name)
    norms = []
    if variant.train_block_norms:
        for i in range(lowest, len(layers)):
            for n in tg.block_norms(layers[i]):
                layers[i].get_submodule(n).requires_grad_(True)
                norms.append(f"{layers_name}.{i}.{n}")
    return wrapped + norms


def _layer_index(name: str, layers_name: str) -> int:
    m = re.match(re.escape(layers_name) + r"\.(\d+)\.", name)
    if m is None:
        raise BigadaptError(f"{name}: not inside the transformer layers {layers_name}")
    return int(m.group(1))


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def merge(model: nn.Module) -> None:
    names = sorted({m.variant for m in model.modules() if isinstance(m, Adapter)}) or ["adapters"]
    raise BigadaptError(f"{'/'.join(names)}: adapters cannot be merged into the base: the bottleneck's "
                        f"nonlinearity is not a linear map, so no weight can absorb it; serve the model unmerged")


def unmerge(model: nn.Module) -> None:
    """Nothing to undo: an adapter is never merged."""
