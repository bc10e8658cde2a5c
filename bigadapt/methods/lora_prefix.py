"""LoRA + PE and LoRA + PL (Table 15): LoRA on `method.targets` (rank `r`, `alpha`) plus prefix-embedding
(`lora+pe`) or prefix-layer (`lora+pl`) tuning with `l_p`, `l_i`. The two compose without knowing of each
other: |Θ| = 2 L̂_LoRA d r + (1 or L) d (l_p + l_i).
"""
from __future__ import annotations

from torch import nn

from ..errors import BigadaptError
from . import lora, prefix


def validate(mcfg) -> None:
    prefix.validate(mcfg)
    check = getattr(lora, "validate", None)
    if check:
        check(mcfg)


def inject(model: nn.Module, mcfg) -> list[str]:
    return lora.inject(model, mcfg) + prefix.inject_prefix(model, mcfg, per_layer=mcfg.name == "lora+pl")


extra_inputs = prefix.extra_inputs


def merge(model: nn.Module) -> None:
    raise BigadaptError("lora+pe/lora+pl cannot be merged: the LoRA part could fold into the base weights, but the "
                        "prefix lengthens the input sequence and cannot; serve the model unmerged")


def unmerge(model: nn.Module) -> None:
    """Nothing to undo: never merged."""
