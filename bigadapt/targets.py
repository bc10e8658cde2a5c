"""Where the paper's weight matrices live in each architecture.

The paper names W_q, W_k, W_v, W_o and the two FFN matrices; here they are `q k v o ffn_in ffn_out` (plus
`ffn_gate` for gated LLaMA-style FFNs). Each maps to a regex on module names; GPT-2's fused `c_attn`
holds q, k and v as three equal slices of one output. Anything that is not a paper name is a
module-name pattern (a suffix such as `attn.c_proj`, or a full-name regex).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from torch import nn

from .errors import ConfigError

PAPER_NAMES = ("q", "k", "v", "o", "ffn_in", "ffn_out", "ffn_gate")

# model_type -> paper name -> (regex on the module's qualified name, slice index into a fused output or None)
_GPT2 = {
    "q": (r"\.attn\.c_attn$", 0), "k": (r"\.attn\.c_attn$", 1), "v": (r"\.attn\.c_attn$", 2),
    "o": (r"\.attn\.c_proj$", None), "ffn_in": (r"\.mlp\.c_fc$", None), "ffn_out": (r"\.mlp\.c_proj$", None),
}
_BERT = {
    "q": (r"\.attention\.self\.query$", None), "k": (r"\.attention\.self\.key$", None),
    "v": (r"\.attention\.self\.value$", None), "o": (r"\.attention\.output\.dense$", None),
    "ffn_in": (r"\.intermediate\.dense$", None), "ffn_out": (r"\.layer\.\d+\.output\.dense$", None),
}
_OPT = {
    "q": (r"\.self_attn\.q_proj$", None), "k": (r"\.self_attn\.k_proj$", None),
    "v": (r"\.self_attn\.v_proj$", None), "o": (r"\.self_attn\.out_proj$", None),
    "ffn_in": (r"\.fc1$", None), "ffn_out": (r"\.fc2$", None),
}
_LLAMA = {
    "q": (r"\.self_attn\.q_proj$", None), "k": (r"\.self_attn\.k_proj$", None),
    "v": (r"\.self_attn\.v_proj$", None), "o": (r"\.self_attn\.o_proj$", None),
    "ffn_gate": (r"\.mlp\.gate_proj$", None), "ffn_in": (r"\.mlp\.up_proj$", None),
    "ffn_out": (r"\.mlp\.down_proj$", None),
}
_DEBERTA = dict(_BERT, q=(r"\.attention\.self\.query_proj$", None), k=(r"\.attention\.self\.key_proj$", None),
                v=(r"\.attention\.self\.value_proj$", None))
ARCHS: dict[str, dict] = {
    "gpt2": _GPT2, "bert": _BERT, "roberta": _BERT, "deberta-v2": _DEBERTA, "opt": _OPT,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA,
}
FUSED_PARTS = {"gpt2": 3}  # c_attn = [q | k | v]

# Task heads created fresh for sequence classification: trained and saved with the adapter.
HEAD_NAMES = ("score", "classifier")


@dataclass
class Target:
    name: str  # qualified module name
    module: nn.Module
    kinds: tuple[str, ...]  # paper names (or the pattern) that selected it
    slices: tuple[int, ...] | None = None  # enabled parts of a fused output, e.g. (0, 2) = q and v
    n_parts: int = 1


def model_type(model: nn.Module) -> str:
    return getattr(getattr(model, "config", None), "model_type", "") or ""


def resolve(model: nn.Module, targets: list[str], key: str = "method.targets") -> list[Target]:
    """Each requested target -> the modules it selects; fused slices of one module merge into one Target."""
    mtype = model_type(model)
    found: dict[str, Target] = {}
    for spec in targets:
        hits = _paper_hits(model, mtype, spec, key) if spec in PAPER_NAMES else _pattern_hits(model, spec)
        if not hits:
            raise ConfigError(f"{key}: {spec!r} matches no module of this {mtype or 'model'}; {_hint(mtype)}")
        for name, module, part in hits:
            t = found.setdefault(name, Target(name, module, (), None, FUSED_PARTS.get(mtype, 1) if part is not None
                                              else 1))
            t.kinds += (spec,)
            if part is not None:
                t.slices = tuple(sorted(set(t.slices or ()) | {part}))
    return list(found.values())


def _paper_hits(model, mtype, spec, key):
    table = ARCHS.get(mtype)
    if table is None:
        raise ConfigError(f"{key}: paper name {spec!r} is not mapped for model_type {mtype!r}; "
                          f"name modules by pattern instead (e.g. {key}=[q_proj,v_proj])")
    if spec not in table:
        raise ConfigError(f"{key}: {mtype} has no {spec!r} matrix; {_hint(mtype)}")
    regex, part = table[spec]
    return [(n, m, part) for n, m in model.named_modules() if re.search(regex, n)]


def _pattern_hits(model, spec):
    try:
        re.compile(spec)
    except re.error as e:
        raise ConfigError(f"method.targets: {spec!r} is not a valid module-name pattern ({e})") from None
    return [(n, m, None) for n, m in model.named_modules()
            if n and (n == spec or n.endswith("." + spec) or re.fullmatch(spec, n))
            and isinstance(m, (nn.Linear, _conv1d()))]


def _hint(mtype: str) -> str:
    names = ", ".join(ARCHS[mtype]) if mtype in ARCHS else "none mapped"
    return f"paper names for it: {names}; or give a module-name pattern such as 'attn.c_proj'"


def _conv1d():
    from transformers.pytorch_utils import Conv1D
    return Conv1D


def head_prefixes(model: nn.Module) -> list[str]:
    """Qualified names of the task head modules: a seq_cls head (`score`, `classifier`) and every module whose
    weights the base checkpoint lacked (`model.bigadapt_new_modules`, e.g. DeBERTa's `pooler`, or `bert.pooler`
    when BERT was saved from its masked-LM class): weights no base file holds, so the adapter must."""
    heads = [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)]
    new = getattr(model, "bigadapt_new_modules", [])
    return heads + [n for n in new if not any(n == h or n.startswith(h + ".") for h in heads)]


# The ModuleList of transformer blocks, by the end of its qualified name: GPT-2 `transformer.h`, BERT/RoBERTa
# `<prefix>.encoder.layer`, LLaMA-style `model.layers`, OPT `model.decoder.layers`.
LAYER_LISTS = ("transformer.h", "encoder.layer", "model.layers", "decoder.layers")


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's transformer blocks, lowest first."""
    hits = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)
            and any(n == s or n.endswith("." + s) for s in LAYER_LISTS)]
    if len(hits) != 1:
        found = "none" if not hits else ", ".join(n for n, _ in hits)
        raise ConfigError(f"method.name: cannot tell the transformer layers of this {model_type(model) or 'model'} "
                          f"(looked for a ModuleList ending in {', '.join(LAYER_LISTS)}; found {found})")
    return hits[0]


def is_norm(module: nn.Module) -> bool:
    """LayerNorm or RMSNorm (LLaMA-style models define their own RMSNorm classes)."""
    name = type(module).__name__
    return isinstance(module, nn.LayerNorm) or name.endswith("LayerNorm") or "RMSNorm" in name


def block_norms(block: nn.Module) -> list[str]:
    """Names (relative to the block) of the norms inside one transformer block: two in every family here."""
    return [n for n, m in block.named_modules() if n and is_norm(m)]


def final_norm(model: nn.Module) -> list[str]:
    """The norm after the last block (GPT-2 `ln_f`, LLaMA `norm`, OPT `final_layer_norm`; none in post-LN BERT):
    a norm that is a sibling of the layer list."""
    name, _ = layer_list(model)
    parent = name.rpartition(".")[0]
    module = model.get_submodule(parent) if parent else model
    return [f"{parent}.{n}" if parent else n for n, m in module.named_children() if is_norm(m)]
