"""Where the paper's weight matrices live in each architecture.

The paper names W_q, W_k, W_v, W_o and the two FFN matrices; here they are `q k v o ffn_in ffn_out` (plus
`ffn_gate` for gated LLaMA-style FFNs). Each maps to a regex on module names; GPT-2's fused `c_attn`
holds q, k and v as three equal slices of one output. Anything that is not a paper name is a
module-name pattern (a suffix such as `attn.c_proj`, or a full-name regex), or `all-linear` (peft's
target_modules="all-linear": every Linear/Conv1D in the transformer blocks, not the output head).

Module-name patterns need nothing else of an architecture. Methods that work per block (adapters, prefixes,
ft_top_k) need the ModuleList of blocks: found by name for the families below, else by shape, or named by the
user's `model.blocks`, which `mark_blocks` stamps on the model as it is built.
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
# GPT-NeoX and Falcon fuse q, k and v into `query_key_value` too, but not as [q | k | v]: GPT-NeoX interleaves
# them per head ([heads, 3, head_dim]), Falcon's layout depends on its config (multi-query: [q heads | k | v],
# unequal; new_decoder_architecture: grouped per kv head). Equal slices would train the wrong rows, so q/k/v are
# not mapped there (FUSED_QKV says why); `query_key_value` as a pattern trains all three.
_GPT_NEOX = {"o": (r"\.attention\.dense$", None), "ffn_in": (r"\.mlp\.dense_h_to_4h$", None),
             "ffn_out": (r"\.mlp\.dense_4h_to_h$", None)}
_FALCON = dict(_GPT_NEOX, o=(r"\.self_attention\.dense$", None))
_DISTILBERT = {
    "q": (r"\.attention\.q_lin$", None), "k": (r"\.attention\.k_lin$", None),
    "v": (r"\.attention\.v_lin$", None), "o": (r"\.attention\.out_lin$", None),
    "ffn_in": (r"\.ffn\.lin1$", None), "ffn_out": (r"\.ffn\.lin2$", None),
}
_PHI = {"q": _LLAMA["q"], "k": _LLAMA["k"], "v": _LLAMA["v"], "o": (r"\.self_attn\.dense$", None),
        "ffn_in": (r"\.mlp\.fc1$", None), "ffn_out": (r"\.mlp\.fc2$", None)}
# Mixtral's experts are 3-D tensors of one MixtralExperts module (transformers >= 5), not Linear layers: only the
# attention matrices are Linear. An adapter's FFN site there is the whole MoE block's output (ADAPTER_SITES).
_MIXTRAL = {k: _LLAMA[k] for k in ("q", "k", "v", "o")}
ARCHS: dict[str, dict] = {
    "gpt2": _GPT2, "bert": _BERT, "roberta": _BERT, "deberta-v2": _DEBERTA, "opt": _OPT,
    "llama": _LLAMA, "mistral": _LLAMA, "qwen2": _LLAMA, "gemma": _LLAMA,
    "gpt_neox": _GPT_NEOX, "falcon": _FALCON, "distilbert": _DISTILBERT, "phi": _PHI, "mixtral": _MIXTRAL,
}
FUSED_PARTS = {"gpt2": 3}  # c_attn = [q | k | v]
FUSED_QKV = {"gpt_neox": "[heads, 3, head_dim]", "falcon": "a layout that depends on its config"}
MOE = {"mixtral": "its experts are 3-D tensors of one MixtralExperts module, not Linear layers"}
# paper name -> the module whose output is that sublayer's output, where no Linear is (an adapter wraps it)
ADAPTER_SITES = {"mixtral": {"ffn_out": r"\.block_sparse_moe$|\.mlp$"}}
ALL_LINEAR = "all-linear"

# Task heads created fresh for sequence classification: trained and saved with the adapter (T5/BART name theirs
# `classification_head`).
HEAD_NAMES = ("score", "classifier", "classification_head")


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
        if spec == ALL_LINEAR:
            hits = _all_linear(model)
        elif spec in PAPER_NAMES:
            hits = _paper_hits(model, mtype, spec, key)
        else:
            hits = _pattern_hits(model, spec, key)
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
                          f"name modules by pattern instead (e.g. {key}=[q_proj,v_proj], or all-linear)")
    if spec in ("q", "k", "v") and mtype in FUSED_QKV:
        raise ConfigError(f"{key}: {mtype} fuses q, k and v into query_key_value in {FUSED_QKV[mtype]}, not "
                          f"[q|k|v] slices; target it whole: {key}=[query_key_value] (or {ALL_LINEAR})")
    if spec not in table:
        why = f" ({MOE[mtype]})" if mtype in MOE and spec.startswith("ffn") else ""
        raise ConfigError(f"{key}: {mtype} has no {spec!r} matrix{why}; {_hint(mtype)}")
    regex, part = table[spec]
    return [(n, m, part) for n, m in model.named_modules() if re.search(regex, n)]


def _pattern_hits(model, spec, key):
    try:
        re.compile(spec)
    except re.error as e:
        raise ConfigError(f"{key}: {spec!r} is not a valid module-name pattern ({e})") from None
    named = [(n, m) for n, m in model.named_modules()
             if n and (n == spec or n.endswith("." + spec) or re.fullmatch(spec, n))]
    hits = [(n, m, None) for n, m in named if _is_linear(m)]
    if named and not hits:  # e.g. MoE experts held as 3-D tensors: say so rather than "matches nothing"
        n, m = named[0]
        why = f" ({MOE[model_type(model)]})" if model_type(model) in MOE else ""
        raise ConfigError(f"{key}: {spec!r} names {n} ({type(m).__name__}), not an nn.Linear or Conv1D{why}; "
                          f"name the Linear layers inside it, or use {ALL_LINEAR}")
    return hits


def _all_linear(model):
    """peft's all-linear: every Linear/Conv1D in the blocks; without known blocks, every one but the heads (the
    output embedding and a seq_cls head), as peft excludes the output layer."""
    found = find_blocks(model)
    if found:
        prefix = found[0] + "."
        return [(n, m, None) for n, m in model.named_modules() if n.startswith(prefix) and _is_linear(m)]
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    heads = head_prefixes(model)
    return [(n, m, None) for n, m in model.named_modules() if _is_linear(m) and m is not out
            and not any(n == h or n.startswith(h + ".") for h in heads)]


def _is_linear(m: nn.Module) -> bool:
    return isinstance(m, (nn.Linear, _conv1d()))


def _hint(mtype: str) -> str:
    names = ", ".join(ARCHS[mtype]) if mtype in ARCHS else "none mapped"
    return f"paper names for it: {names}; or give a module-name pattern such as 'attn.c_proj', or {ALL_LINEAR}"


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


# The ModuleList of transformer blocks, by the end of its qualified name: GPT-2/Falcon/BLOOM `transformer.h`,
# BERT/RoBERTa `<prefix>.encoder.layer`, LLaMA-style (Phi, Gemma, Mixtral) `model.layers`, OPT `model.decoder.layers`,
# GPT-NeoX `gpt_neox.layers`, DistilBERT `distilbert.transformer.layer`.
LAYER_LISTS = ("transformer.h", "encoder.layer", "model.layers", "decoder.layers", "gpt_neox.layers",
               "transformer.layer")
BLOCKS_ATTR = "bigadapt_blocks"  # the user's model.blocks, stamped on the model by mark_blocks


def mark_blocks(model: nn.Module, name: str | None) -> None:
    """Record `model.blocks` on the model (so methods, which see only the method config, find it); a name that
    is not a ModuleList of this model is refused."""
    if not name:
        return
    try:
        module = model.get_submodule(name)
    except AttributeError:
        module = None
    if not isinstance(module, nn.ModuleList):
        what = "no module" if module is None else f"a {type(module).__name__}, not a ModuleList"
        raise ConfigError(f"model.blocks={name!r}: {what} in this {model_type(model) or 'model'}; "
                          f"set it to the ModuleList of transformer blocks{_blocks_example(model)}")
    setattr(model, BLOCKS_ATTR, name)


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList] | None:
    """(qualified name, ModuleList) of the transformer blocks, or None where they cannot be told: `model.blocks`;
    else the one ModuleList with a known name; else the one outermost ModuleList of `num_hidden_layers` modules
    of a single class (an architecture not listed above)."""
    name = getattr(model, BLOCKS_ATTR, None)
    if name:
        return name, model.get_submodule(name)
    lists = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.ModuleList)]
    hits = [(n, m) for n, m in lists if any(n == s or n.endswith("." + s) for s in LAYER_LISTS)]
    if not hits:
        depth = getattr(getattr(model, "config", None), "num_hidden_layers", None)
        hits = [(n, m) for n, m in lists if len(m) == depth and len({type(b) for b in m}) == 1]
        hits = [(n, m) for n, m in hits if not any(n.startswith(o + ".") for o, _ in hits)]
    return hits[0] if len(hits) == 1 else None


def layer_list(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """(qualified name, ModuleList) of the model's transformer blocks, lowest first; one ConfigError line naming
    `model.blocks` where they cannot be told."""
    found = find_blocks(model)
    if found is None:
        raise ConfigError(f"model.blocks: cannot tell the transformer blocks of this "
                          f"{model_type(model) or 'model'}; set it to the ModuleList of transformer blocks"
                          f"{_blocks_example(model)}")
    return found


def _blocks_example(model: nn.Module) -> str:
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and n]
    return f", e.g. model.blocks={min(lists, key=lambda n: n.count('.'))}" if lists else " (this model has none)"


def adapter_sites(model: nn.Module, names: list[str], key: str) -> list[Target]:
    """The modules whose outputs are the sublayer outputs `names` (paper names): their Linear layers, or where
    an architecture has none (an MoE FFN) the whole sublayer (ADAPTER_SITES)."""
    sites = ADAPTER_SITES.get(model_type(model), {})
    found = resolve(model, [n for n in names if n not in sites], key=key)
    for n in names:
        if n in sites:
            found += [Target(name, m, (n,)) for name, m in model.named_modules() if re.search(sites[n], name)]
    return found


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
