"""A PiSSA/OLoRA run exported to peft as a plain LoRA on the ORIGINAL base, as peft's
`save_pretrained(path_initial_model_for_weight_conversion=...)` does (`LoraModel.subtract_mutated_init`).

The run trains on the residual base W0 - s B0 A0, so its model is W0 + s (B A - B0 A0). That delta is a LoRA of
rank 2r at the same scaling: s [B | -B0] [A ; A0]. peft writes A' = cat(A, A0) (rows), B' = cat(B, -B0) (columns)
and doubles r and lora_alpha (alpha/r unchanged); bigadapt writes per-module ranks and alphas, doubled alike.
A0 and B0 are rebuilt from the original base exactly as the run built them (methods/lora_init.py).
"""
from __future__ import annotations

from pathlib import Path

import torch

from .errors import CheckpointError
from .methods.lora_init import FROM_W0

PREFIX = "base_model.model."


def to_original_base(path: str | Path, cfg, tensors: dict, rank_pattern: dict, alpha_pattern: dict) -> None:
    """In place: the exported LoRA tensors and per-module ranks/alphas of a run initialised from W0 (pissa, olora)
    become those of a plain LoRA on the original base. Other inits are left as they are."""
    if cfg.method.lora_init not in FROM_W0:
        return
    if cfg.method.dora:  # DoRA's magnitude was normed on the residual base: no exact delta on W0 exists
        raise CheckpointError(f"{path}: a DoRA run initialised with method.lora_init={cfg.method.lora_init} has no "
                              f"exact peft form on the original base; export a run with lora_init=kaiming/gaussian")
    from .export import _full_B, load_trained
    from .methods.lora import lora_modules
    initial, _, _ = load_trained(path, untrained=True)  # A0, B0 as the run drew them, from the original base
    for name, m0 in lora_modules(initial):
        a, b = f"{PREFIX}{name}.lora_A.weight", f"{PREFIX}{name}.lora_B.weight"
        tensors[a] = torch.cat([tensors[a], m0.lora_A.detach().float()], dim=0).contiguous()
        tensors[b] = torch.cat([tensors[b], -_full_B(m0)], dim=1).contiguous()
        rank_pattern[name] *= 2
        alpha_pattern[name] *= 2  # alpha = scaling x rank: the scaling stays
