"""Fine-tuning baselines: `full` (every base parameter) and `ft_top_k` (the last `method.top_k` layers).

`ft_top_k` with top_k = 2 is the LoRA paper's FTTop2 (Li & Liang 2021: "fine-tune only the top 2 layers"):
the last k transformer blocks plus the norm after the last block (GPT-2 `ln_f`, LLaMA `norm`; BERT has none).
On GPT-2 medium that is 25,192,448 + 2,048 = 25.19M either way, the paper's count. Embeddings, and the
output layer tied to them, stay frozen.

The trained tensors are base tensors: the model is already "merged", so `merge`/`unmerge` have nothing to
do. Under ZeRO-3 `full` is ordinary sharded fine-tuning: every rank keeps 1/N of the fp32 masters and moments.
"""
from __future__ import annotations

from torch import nn

from .. import targets as tg
from ..errors import ConfigError


def validate(mcfg) -> None:
    if mcfg.name == "ft_top_k" and mcfg.top_k < 1:
        raise ConfigError(f"method.top_k={mcfg.top_k!r}: ft_top_k trains the last k layers, so k must be >= 1 "
                          f"(the paper's FTTop2 is top_k=2)")


def inject(model: nn.Module, mcfg) -> list[str]:
    """Unfreeze the base (all of it, or the top k blocks + final norm); a task head is left to `apply`."""
    validate(mcfg)
    heads = tg.head_prefixes(model)
    if mcfg.name == "full":
        names = [n for n, _ in model.named_children() if n not in heads]
    else:
        names = _top_k(model, mcfg.top_k)
    for n in names:
        model.get_submodule(n).requires_grad_(True)
    return names


def _top_k(model: nn.Module, k: int) -> list[str]:
    layers_name, layers = tg.layer_list(model)
    if k > len(layers):
        raise ConfigError(f"method.top_k={k}: this {tg.model_type(model)} has {len(layers)} layers; "
                          f"choose 1..{len(layers)} (or method.name=full)")
    return [f"{layers_name}.{i}" for i in range(len(layers) - k, len(layers))] + tg.final_norm(model)


def merge(model: nn.Module) -> None:
    """Nothing to fold: the trained weights are the base's own tensors."""


def unmerge(model: nn.Module) -> None:
    """Nothing to undo (see merge)."""
