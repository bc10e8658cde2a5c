"""Task `sft` rows: prompt/completion or chat messages -> `{input_ids, loss_mask}`, optionally packed.

`loss_mask[j] = 1` marks token j as a target (the completion, or every assistant turn with its end-of-turn
marker); everything else is context. Token 0 of a row is never predicted, so a row's loss terms are
`sum(loss_mask[1:])` (batching.count_targets). Each encoder is a batched `datasets.map` function; rows left
with no target after truncation to `data.seq_len` are dropped (they would add nothing to the loss, and a
batch of only such rows would normalise by zero).

Packing concatenates whole examples into rows of at most seq_len tokens and adds `position_ids` that restart
at 0 for each example: transformers then attends within each example only (masking_utils.
find_packed_sequence_indices, used when no attention mask is given and no KV cache is in use). Each example's
first token is masked, as it is unpacked: it would be predicted from the previous example's last token.
"""
from __future__ import annotations

from collections.abc import Callable

from bigadapt.errors import DataError

from .chat import encode_chat, encode_text
from .files import ROW

STATS = ("n_tokens", "n_targets", "truncated")  # per-row columns the summary sums


def _text(value, where: str, row: int, column: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str):
        raise DataError(f"{where} row {row} column {column!r}: expected text, got {type(value).__name__}")
    if not allow_empty and not value.strip():
        raise DataError(f"{where} row {row} column {column!r}: empty; every row needs a non-empty {column}")
    return value


def _emit(out: dict, ids: list[int], mask: list[int], seq_len: int) -> None:
    """Append one example cut to seq_len, unless no target token is left in it."""
    kept_ids, kept_mask = ids[:seq_len], mask[:seq_len]
    targets = sum(kept_mask[1:])
    if targets == 0:
        return
    out["input_ids"].append(kept_ids)
    out["loss_mask"].append(kept_mask)
    out["n_tokens"].append(len(kept_ids))
    out["n_targets"].append(targets)
    out["truncated"].append(int(len(ids) > seq_len))


def _empty() -> dict:
    return {"input_ids": [], "loss_mask": [], **{k: [] for k in STATS}}


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The prompt with the tokenizer's own leading specials (LLaMA's <s>); the byte fallback adds none."""
    if getattr(tokenizer, "is_fallback", False):
        return tokenizer.encode(text)
    return list(tokenizer(text, add_special_tokens=True)["input_ids"])


def prompt_completion(tokenizer, data_cfg, where: str) -> Callable:
    """Prompt (context) then completion + eos (targets), each tokenized on its own: at generation the prompt
    is tokenized alone too, so training sees the same split."""
    p_col, c_col, seq, eos = data_cfg.prompt_column, data_cfg.completion_column, data_cfg.seq_len, \
        tokenizer.eos_token_id

    def encode(batch: dict) -> dict:
        out = _empty()
        for row, p, c in zip(batch[ROW], batch[p_col], batch[c_col]):
            prompt = encode_prompt(tokenizer, _text(p, where, row, p_col, allow_empty=True))
            completion = encode_text(tokenizer, _text(c, where, row, c_col)) + [eos]
            _emit(out, prompt + completion, [0] * len(prompt) + [1] * len(completion), seq)
        return out
    return encode


def _messages(value, where: str, row: int, column: str) -> list[dict]:
    bad = f"{where} row {row} column {column!r}: expected a list of {{role, content}} messages"
    if not isinstance(value, list) or not value:
        raise DataError(f"{bad}, got {type(value).__name__ if value else 'an empty list'}")
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise DataError(f"{bad}; message {i} is {str(m)[:60]}")
    if not any(m["role"] == "assistant" for m in value):
        raise DataError(f"{where} row {row} column {column!r}: no assistant message, so nothing to learn")
    # arrow stores a list of structs with the union of keys: drop the keys this message did not have
    return [{k: v for k, v in m.items() if v is not None} for m in value]


def chat_messages(tokenizer, template: str, data_cfg, where: str) -> Callable:
    col, seq = data_cfg.messages_column, data_cfg.seq_len

    def encode(batch: dict) -> dict:
        out = _empty()
        for row, value in zip(batch[ROW], batch[col]):
            messages = _messages(value, where, row, col)
            ids, mask = encode_chat(tokenizer, template, messages, f"{where} row {row} column {col!r}: ")
            _emit(out, ids, mask, seq)
        return out
    return encode


def packer(seq_len: int) -> Callable:
    """Whole examples, in order, first-fit into rows of <= seq_len tokens (within one map batch)."""
    def pack(batch: dict) -> dict:
        out = {"input_ids": [], "loss_mask": [], "position_ids": [], **{k: [] for k in STATS}}
        row: dict = {}
        for ids, mask, trunc in zip(batch["input_ids"], batch["loss_mask"], batch["truncated"]):
            if row and len(row["input_ids"]) + len(ids) > seq_len:
                _flush(out, row)
                row = {}
            row.setdefault("input_ids", []).extend(ids)
            row.setdefault("loss_mask", []).extend([0, *mask[1:]])
            row.setdefault("position_ids", []).extend(range(len(ids)))
            row["truncated"] = row.get("truncated", 0) + trunc
        if row:
            _flush(out, row)
        return out
    return pack


def _flush(out: dict, row: dict) -> None:
    for key in ("input_ids", "loss_mask", "position_ids", "truncated"):
        out[key].append(row[key])
    out["n_tokens"].append(len(row["input_ids"]))
    out["n_targets"].append(sum(row["loss_mask"][1:]))
