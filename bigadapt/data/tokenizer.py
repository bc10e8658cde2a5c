"""The tokenizer of a run: the model's own (AutoTokenizer), or a byte-level fallback for config-built bases.

Tests and offline demos build random-init bases from a transformers config, which ship no tokenizer. The
fallback needs no file and is a pure function of (text, vocab_size), so every rank tokenizes identically.
It answers the handful of calls the tasks make of a Hugging Face tokenizer: `__call__` on a text or a pair
(with truncation), `encode`, `decode`, and the special-token ids.
"""
from __future__ import annotations

from bigadapt.errors import ConfigError

SPECIALS = 3  # ids 0 (pad/eos), 1 (bos/cls), 2 (sep); bytes start at 3


class ByteTokenizer:
    """UTF-8 bytes as ids `3 + byte % (vocab_size - 3)`.

    With vocab_size >= 259 the mapping is exact and `decode` inverts `encode`; smaller (test) vocabularies
    fold bytes together, so decoding is lossy there but still deterministic.
    """

    is_fallback = True

    def __init__(self, vocab_size: int, eos_token_id: int = 0):
        if vocab_size <= SPECIALS:
            raise ConfigError(f"model vocab_size={vocab_size}: the byte fallback tokenizer needs > {SPECIALS}")
        self.vocab_size = vocab_size
        self.pad_token_id = 0
        self.eos_token_id = eos_token_id
        self.cls_token_id, self.sep_token_id = 1, 2
        self.padding_side = "right"

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        span = self.vocab_size - SPECIALS
        ids = [SPECIALS + b % span for b in text.encode("utf-8")]
        return [self.cls_token_id, *ids, self.sep_token_id] if add_special_tokens else ids

    def __call__(self, text, text_pair=None, truncation: bool = False, max_length: int | None = None,
                 add_special_tokens: bool = True) -> dict:
        """`[cls] a [sep] (b [sep])`, truncated longest-first to max_length, like a BERT-style tokenizer."""
        if isinstance(text, list):
            pairs = text_pair if text_pair is not None else [None] * len(text)
            rows = [self(a, b, truncation, max_length, add_special_tokens)["input_ids"] for a, b in zip(text, pairs)]
            return {"input_ids": rows}
        a = self.encode(text)
        b = self.encode(text_pair) if text_pair is not None else None
        if truncation and max_length:
            extra = (3 if b is not None else 2) if add_special_tokens else 0
            a, b = _longest_first(a, b, max(0, max_length - extra))
        if not add_special_tokens:
            return {"input_ids": a + (b or [])}
        ids = [self.cls_token_id, *a, self.sep_token_id]
        return {"input_ids": ids + [*b, self.sep_token_id] if b is not None else ids}

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        data = bytes((int(i) - SPECIALS) % 256 for i in ids if int(i) >= SPECIALS or not skip_special_tokens)
        return data.decode("utf-8", errors="replace")


def _longest_first(a: list[int], b: list[int] | None, budget: int) -> tuple[list[int], list[int] | None]:
    """Trim the longer of the two until both fit (Hugging Face's 'longest_first')."""
    if b is None:
        return a[:budget], None
    la, lb = len(a), len(b)
    while la + lb > budget:
        excess = la + lb - budget
        if la != lb:  # cut the longer one down towards the other
            if la > lb:
                la -= min(la - lb, excess)
            else:
                lb -= min(lb - la, excess)
        else:  # equal: alternate, the first text giving the odd token
            la, lb = la - (excess + 1) // 2, lb - excess // 2
    return a[:la], b[:lb]


def load_tokenizer(mcfg, vocab_size: int, eos_token_id: int | None = None):
    """`model.tokenizer` when set, else the model's own (hub id or local directory), else the byte fallback."""
    source = getattr(mcfg, "tokenizer", None) or mcfg.name_or_path
    key = "model.tokenizer" if getattr(mcfg, "tokenizer", None) else "model.name_or_path"
    if not source:
        return ByteTokenizer(vocab_size, 0 if eos_token_id is None else eos_token_id)
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(source, trust_remote_code=mcfg.trust_remote_code)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{key}={source!r}: no tokenizer could be loaded "
                          f"({str(e).splitlines()[0][:120]}); offline, pass a local directory with the "
                          f"tokenizer files") from None
