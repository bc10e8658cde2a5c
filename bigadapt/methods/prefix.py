"""Prefix-embedding tuning (PreEmbed) and prefix-layer tuning (PreLayer), the LoRA paper's baselines (§5.1).

Both insert l_p + l_i virtual tokens "among the input tokens": per row, the l_p prefix vectors go right before
the row's first real token and the l_i infix vectors right after its last real token (or after its first
`infix_at` real tokens, see below). Padding stays where it was, outside the block:

    right-padded   [prefix] x_1 .. x_n [infix] pad ..          left-padded   pad .. [prefix] x_1 .. x_n [infix]

The frozen model runs on that longer sequence exactly as if the virtual vectors were token embeddings: the
attention mask marks them real; position ids are what the model assigns to the longer input by default, or
the caller's ids shifted past the virtual slots; token-type ids copy the neighbouring token's. Outputs
(hidden states, logits) come back at the original positions only, so loss code, pooling and the KV-cache
bookkeeping of `generate` see the input's length. One exception makes the infix useful in decoders: the
output returned at the last token before the infix is read from the last infix slot — in a causal model the
output at position j predicts token j+1, and the token that follows x_n in the long sequence is predicted
there. So a GPT-style classifier (pooled at the last real token) and `generate` read [prefix] x [infix], the
paper's layout. Encoders (BERT/RoBERTa) attend both ways and need no read-out swap.

`model(..., infix_at=k)` (a LongTensor [B] or an int) puts the infix after the first k real tokens instead,
e.g. between a prompt and its completion; decoding with a KV cache keeps the infix where the prefill put it.

- `pre_embed`: |Θ| = d_model × (l_p + l_i): one [l_p + l_i, d] table, `prefix_tuning.embedding.weight`.
- `pre_layer`: |Θ| = L × d_model × (l_p + l_i): the same table is the first layer's input, and the output of
  each block but the last is overwritten at the virtual slots by `prefix_tuning.after_layer.<i>.weight` (the
  last block's output there is computed, so the infix read-out is trained too).

Vectors start as the embeddings of random vocabulary tokens and are fp32 whatever the base dtype. Every read
goes through a `VirtualTokens.forward`, so ZeRO-3's module hooks gather the table (outside a forward it is an
empty placeholder). Nothing here can be merged into base weights: the virtual tokens lengthen the sequence.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial
from types import SimpleNamespace

import torch
from torch import nn

from .. import targets as tg
from .. import zero
from ..errors import BigadaptError, ConfigError

# bidirectional encoders: every token sees the infix, so no read-out swap
ENCODER_TYPES = ("bert", "roberta", "xlm-roberta", "camembert", "deberta", "deberta-v2", "electra", "distilbert")


def validate(mcfg) -> None:
    if mcfg.l_p + mcfg.l_i <= 0:
        raise ConfigError(f"method.l_p={mcfg.l_p}: {mcfg.name} needs virtual tokens, l_p + l_i > 0 "
                          f"(the paper: PreEmbed l_p=256 l_i=8, PreLayer l_p=l_i=8); set method.l_p and method.l_i")


class VirtualTokens(nn.Module):
    """l_p + l_i trainable vectors [l_p + l_i, d]: rows 0..l_p-1 the prefix, the rest the infix."""

    def __init__(self, rows: torch.Tensor, l_p: int):
        super().__init__()
        self.l_p = l_p
        self.weight = nn.Parameter(rows)

    def forward(self, h: torch.Tensor, layout: Layout) -> torch.Tensor:
        """h [B, T', d] with the virtual slots replaced by this table's rows."""
        rows = self.weight.to(h.dtype)[layout.slot]
        return torch.where(layout.virtual.unsqueeze(-1), rows, h)

    def extra_repr(self) -> str:
        return f"l_p={self.l_p}, l_i={self.weight.shape[0] - self.l_p}, d={self.weight.shape[1]}"


class PrefixTuning(nn.Module):
    """The trainable part, attached to the model as `prefix_tuning`; the hooks that use it live beside it."""

    def __init__(self, rows: torch.Tensor, l_p: int, l_i: int, n_after: int):
        super().__init__()
        self.l_p, self.l_i = l_p, l_i
        self.embedding = VirtualTokens(rows, l_p)
        self.after_layer = nn.ModuleList(VirtualTokens(rows.clone(), l_p) for _ in range(n_after)) if n_after else None


@dataclass
class Layout:
    """Where each slot of the extended sequence (length T' = T + l_p + l_i) comes from, per row."""
    virtual: torch.Tensor  # bool [B, T']: a virtual token
    slot: torch.Tensor  # long [B, T']: its row in the table (0 elsewhere)
    near: torch.Tensor  # long [B, T']: the original column a slot copies (a virtual slot: its neighbour's)
    readout: torch.Tensor  # long [B, T]: the slot whose output is returned at each original column
    start: torch.Tensor  # long [B]: the first real column (where the real block begins)


def make_layout(mask: torch.Tensor, l_p: int, l_i: int, infix_at: torch.Tensor | None, causal: bool) -> Layout:
    """Assumes each row's real tokens are one contiguous block (left or right padding)."""
    B, T = mask.shape
    V = l_p + l_i
    real = mask.bool()
    n = real.sum(1)
    a = torch.where(n > 0, real.int().argmax(1), 0)
    s = n if infix_at is None else torch.minimum(infix_at.to(n.device).expand(B).clamp(min=0), n)
    a_, s_ = a[:, None], s[:, None]
    c = torch.arange(T + V, device=mask.device)[None]
    rel = c - a_
    pre = (rel >= 0) & (rel < l_p)
    inf = (rel >= l_p + s_) & (rel < V + s_)
    shift = torch.where(rel < 0, 0, torch.where(rel < l_p + s_, l_p, V))
    near = torch.where(pre, a_, torch.where(inf, a_ + (s_ - 1).clamp(min=0), c - shift)).clamp(0, T - 1)
    slot = torch.where(pre, rel, torch.where(inf, rel - s_, 0))
    j = torch.arange(T, device=mask.device)[None]
    readout = j + torch.where(j < a_, 0, torch.where(j < a_ + s_, l_p, V))
    if causal and l_i:  # the token before the infix reads the last infix slot (it predicts the next token)
        swap = (j == a_ + s_ - 1) & (s_ > 0)
        readout = torch.where(swap, a_ + V + s_ - 1, readout)
    return Layout(pre | inf, slot, near, readout, a)


# ---------------------------------------------------------------- hooks
def _take_infix_at(state, module, args, kwargs):
    state.infix_at = kwargs.pop("infix_at", None)
    return args, kwargs


def _extend_inputs(prefix: PrefixTuning, emb: nn.Module, names: list[str], state, causal: bool,
                   body, args, kwargs):
    """Body pre-hook: token ids -> embeddings with the virtual tokens spliced in; mask/positions to match."""
    kw = dict(zip(names, args), **kwargs)
    infix_at, state.infix_at, state.layout = state.infix_at, None, None
    cache = kw.get("past_key_values")
    past = cache.get_seq_length() if cache is not None else 0
    if past:  # decoding: the virtual tokens are in the cache already
        return (), _shift_for_cache(kw, past, prefix.l_p + prefix.l_i)
    x = kw.pop("inputs_embeds", None)
    ids = kw.pop("input_ids", None)
    x = emb(ids) if x is None else x
    mask = kw.get("attention_mask")
    mask2d = torch.ones(x.shape[:2], dtype=torch.long, device=x.device) if mask is None else mask
    if mask2d.dim() != 2:
        raise BigadaptError("prefix tuning needs a 2-D attention_mask [batch, seq] (got a 4-D one)")
    if isinstance(infix_at, int):
        infix_at = torch.tensor(infix_at)
    layout = state.layout = make_layout(mask2d, prefix.l_p, prefix.l_i, infix_at, causal)
    kw["inputs_embeds"] = prefix.embedding(x.gather(1, _rows(layout.near, x.shape[-1])), layout)
    return (), _extend_side_inputs(kw, layout)


def _extend_side_inputs(kw: dict, layout: Layout) -> dict:
    """Mask: virtual tokens are real. Token types: the neighbour's. Positions: counted through the virtual slots."""
    mask = kw.get("attention_mask")
    if mask is not None:
        kw["attention_mask"] = torch.where(layout.virtual, 1, mask.gather(1, layout.near)).to(mask.dtype)
    if kw.get("token_type_ids") is not None:
        kw["token_type_ids"] = kw["token_type_ids"].expand(layout.readout.shape).gather(1, layout.near)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = _extend_positions(kw["position_ids"], layout)
    return kw


def _extend_positions(p: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Caller's ids (contiguous over each row's real block) continued through the virtual slots."""
    B = layout.near.shape[0]
    p = p.expand(B, -1)
    first = p.gather(1, layout.start[:, None])
    rel = torch.arange(layout.near.shape[1], device=p.device)[None] - layout.start[:, None]
    return torch.where(rel >= 0, first + rel, p.gather(1, layout.near))


def _shift_for_cache(kw: dict, past: int, V: int) -> dict:
    """New tokens come after the cached [prefix .. infix]: V more mask columns, positions V further on."""
    mask = kw.get("attention_mask")
    if mask is not None and mask.dim() == 2:
        B, total = mask.shape
        if total + V != past + _new_len(kw):
            raise BigadaptError(f"prefix tuning: attention_mask has {total} columns but the cache holds {past} "
                                f"slots ({V} virtual) plus {_new_len(kw)} new tokens")
        real = mask.bool()
        a = torch.where(real.any(1), real.int().argmax(1), 0)[:, None]
        rel = torch.arange(total + V, device=mask.device)[None] - a
        near = torch.where(rel < 0, rel + a, (rel + a - V).clamp(min=0))
        near = torch.where((rel >= 0) & (rel < V), a, near).clamp(max=total - 1)
        kw["attention_mask"] = torch.where((rel >= 0) & (rel < V), 1, mask.gather(1, near)).to(mask.dtype)
    if kw.get("position_ids") is not None:
        kw["position_ids"] = kw["position_ids"] + V
    return kw


def _new_len(kw: dict) -> int:
    x = kw.get("input_ids")
    return (x if x is not None else kw["inputs_embeds"]).shape[1]


def _rows(index: torch.Tensor, d: int) -> torch.Tensor:
    return index.unsqueeze(-1).expand(-1, -1, d)


def _overwrite_after_layer(table: VirtualTokens, state, block, args, output):
    """Block post-hook (PreLayer): the activations at the virtual slots are replaced by trainable ones."""
    if state.layout is None:
        return output
    if isinstance(output, tuple):
        return (table(output[0], state.layout),) + output[1:]
    return table(output, state.layout)


def _strip_outputs(body, state, module, args, kwargs, output):
    """Body post-hook: hidden states at the original positions (and the infix read-out), pooler redone."""
    layout = state.layout
    if layout is None:
        return output
    T_ext = layout.virtual.shape[1]

    def strip(h):
        if torch.is_tensor(h) and h.dim() == 3 and h.shape[1] == T_ext:
            return h.gather(1, _rows(layout.readout, h.shape[-1]))
        return h

    if isinstance(output, tuple):
        return tuple(strip(h) for h in output)
    last = strip(output[0])
    output["last_hidden_state"] = last
    if output.get("hidden_states") is not None:
        output["hidden_states"] = tuple(strip(h) for h in output["hidden_states"])
    if output.get("pooler_output") is not None and getattr(body, "pooler", None) is not None:
        output["pooler_output"] = body.pooler(last)  # BERT pools its first slot: the prefix, not [CLS]
    return output


# ---------------------------------------------------------------- injection
def inject(model: nn.Module, mcfg) -> list[str]:
    return inject_prefix(model, mcfg, per_layer=mcfg.name == "pre_layer")


def inject_prefix(model: nn.Module, mcfg, per_layer: bool) -> list[str]:
    """Attach `prefix_tuning` (PreEmbed table, plus L-1 per-layer tables for PreLayer) and its hooks."""
    validate(mcfg)
    if hasattr(model, "prefix_tuning"):
        raise BigadaptError("prefix tuning is already injected into this model")
    emb = model.get_input_embeddings()
    _, blocks = tg.layer_list(model)
    d = zero.full_shape(emb.weight)[1]
    hidden = getattr(model.config, "hidden_size", d)
    if per_layer and hidden != d:
        raise ConfigError(f"method.name={mcfg.name}: embedding size {d} != hidden size {hidden} "
                          f"(e.g. OPT-350m's projected embeddings) is not supported by pre_layer")
    rows = token_rows(emb, mcfg.l_p + mcfg.l_i)
    model.prefix_tuning = PrefixTuning(rows, mcfg.l_p, mcfg.l_i, len(blocks) - 1 if per_layer else 0)
    _wire(model, model.prefix_tuning, blocks)
    return ["prefix_tuning"]


def token_rows(emb: nn.Module, n: int) -> torch.Tensor:
    """fp32 embeddings of n random vocabulary tokens (*collective* under ZeRO-3: gathers the table once)."""
    vocab, d = zero.full_shape(emb.weight)
    ids = torch.randint(0, vocab, (n,))
    if emb.weight.is_meta:
        return torch.empty(n, d, device="meta")
    with zero.gathered([emb.weight]):
        return emb.weight.detach()[ids.to(emb.weight.device)].float().clone()


def _wire(model: nn.Module, prefix: PrefixTuning, blocks: nn.ModuleList) -> None:
    body = model.base_model
    state = SimpleNamespace(infix_at=None, layout=None)
    causal = not (tg.model_type(model) in ENCODER_TYPES and not getattr(model.config, "is_decoder", False))
    names = [n for n, p in inspect.signature(body.forward).parameters.items()
             if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    # hooks registered before deepspeed.initialize run before ZeRO-3's own on the same module
    model.register_forward_pre_hook(partial(_take_infix_at, state), with_kwargs=True)
    body.register_forward_pre_hook(partial(_extend_inputs, prefix, model.get_input_embeddings(), names, state,
                                           causal), with_kwargs=True)
    body.register_forward_hook(partial(_strip_outputs, body, state), with_kwargs=True)
    for table, block in zip(prefix.after_layer or (), blocks):
        block.register_forward_hook(partial(_overwrite_after_layer, table, state))


def extra_inputs(mcfg, examples: list[dict], objective: str) -> dict:
    """Forward inputs this method needs for a batch: for causal LMs the infix goes between the prompt and
    the target (after `loss_from` tokens), where the paper puts it, so its rows are trained."""
    if objective != "causal_lm" or not mcfg.l_i:
        return {}
    return {"infix_at": torch.tensor([e.get("loss_from", len(e["input_ids"])) for e in examples])}


def merge(model: nn.Module) -> None:
    raise BigadaptError("pre_embed/pre_layer cannot be merged: the virtual tokens lengthen the input sequence, "
                        "which no change of base weights can reproduce; serve the model with the prefix")


def unmerge(model: nn.Module) -> None:
    """Nothing to undo: a prefix is never merged."""
