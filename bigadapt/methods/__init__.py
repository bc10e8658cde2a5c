"""Methods by the paper's names. Each module offers `inject(model, method_cfg) -> list[str]` (the modules it
changed) and, where the math allows, `merge`/`unmerge`. Injection only adds trainable pieces: freezing the
base and choosing the trainable set is the framework's job (see `apply`)."""
from __future__ import annotations

from torch import nn

from .. import targets as tg
from . import lora

METHODS = {"lora": lora}


def apply(model: nn.Module, cfg) -> list[str]:
    """Freeze the base, inject the method, unfreeze a fresh task head; returns the trainable parameter names."""
    model.requires_grad_(False)
    method = METHODS[cfg.method.name]
    method.inject(model, cfg.method)
    if cfg.model.objective == "seq_cls" and cfg.method.train_head:
        for prefix in tg.head_prefixes(model):
            model.get_submodule(prefix).requires_grad_(True)
    return [n for n, p in model.named_parameters() if p.requires_grad]
