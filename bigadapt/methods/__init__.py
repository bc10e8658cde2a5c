"""Methods by the paper's names.

Each method module offers `inject(model, method_cfg) -> list[str]` (the modules or parameters it made
trainable), optionally `validate(method_cfg)` (ConfigErrors for its own keys) and, where the math allows,
`merge(model)` / `unmerge(model)`. Injection only adds or unfreezes: freezing the base first and
unfreezing a fresh task head is the framework's job (`apply`).
"""
from __future__ import annotations

import importlib

import torch
from torch import nn

from .. import targets as tg

# paper name -> module in this package
METHODS = {"lora": "lora", "bitfit": "bitfit", "adapter_h": "adapter", "adapter_l": "adapter", "adapter_p": "adapter",
           "adapter_d": "adapter", "full": "full", "ft_top_k": "full",
           "pre_embed": "prefix", "pre_layer": "prefix", "lora+pe": "lora_prefix", "lora+pl": "lora_prefix",
           "qlora": "qlora"}


def get(name: str):
    return importlib.import_module(f"{__name__}.{METHODS[name]}")


def validate(mcfg) -> None:
    check = getattr(get(mcfg.name), "validate", None)
    if check:
        check(mcfg)


def extra_inputs(cfg, examples: list[dict]) -> dict:
    """Forward inputs a method adds for a batch (e.g. where a prefix method's infix goes); usually none."""
    hook = getattr(get(cfg.method.name), "extra_inputs", None)
    return hook(cfg.method, examples, cfg.model.objective) if hook else {}


def apply(model: nn.Module, cfg) -> list[str]:
    """Freeze the base, inject the method, unfreeze a fresh task head; returns the trainable parameter names.

    The head is the seq_cls classifier and whatever the base checkpoint lacked (`targets.head_prefixes`), for any
    objective: a weight no base file holds is only reproducible if the adapter carries it."""
    model.requires_grad_(False)
    # model.blocks, for a model not built by model.build_base/build_meta (which stamp it already)
    tg.mark_blocks(model, getattr(cfg.model, "blocks", None))
    get(cfg.method.name).inject(model, cfg.method)
    if cfg.method.train_head:
        for prefix in tg.head_prefixes(model):
            model.get_submodule(prefix).requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]


def apply_seeded(model: nn.Module, cfg) -> list[str]:
    """`apply` with the adapter's init drawn from the run's seed: the same on every rank, and rebuilt exactly
    afterwards by anything that needs the untrained adapter (the §7 analyses' controls)."""
    torch.manual_seed(cfg.train.seed + 1)
    return apply(model, cfg)
