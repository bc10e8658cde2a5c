"""Learnable synthetic tasks that need no file and no tokenizer: the embedded default and the tests.

Both are generated from the run's seed, so every rank (and every world size) sees the same examples.
"""
from __future__ import annotations

import torch


def _generator(seed: int, salt: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + salt)


def synthetic_cls(cfg, vocab_size: int, tokenizer=None):
    """Majority vote: label 1 when more tokens come from the lower half of the vocabulary than the upper.

    Token 0 is kept for padding. Chance accuracy is 50%; the signal is spread over every position, so the
    classifier must attend across the sequence rather than read one token.
    """
    from . import TaskData

    def make(n: int, salt: int) -> list[dict]:
        g = _generator(cfg.train.seed, salt)
        ids = torch.randint(1, vocab_size, (n, cfg.data.seq_len), generator=g)
        low = (ids < (vocab_size + 1) // 2).sum(1)
        labels = (2 * low > cfg.data.seq_len).long()
        return [{"input_ids": row.tolist(), "label": int(y)} for row, y in zip(ids, labels)]

    return TaskData(make(cfg.data.num_train, 1), make(cfg.data.num_eval, 2), "seq_cls", 2)


def synthetic_lm(cfg, vocab_size: int, tokenizer=None):
    """Copy task: a random key of seq_len/2 tokens, then the key again; the loss covers the copy only."""
    from . import TaskData

    half = max(1, cfg.data.seq_len // 2)

    def make(n: int, salt: int) -> list[dict]:
        g = _generator(cfg.train.seed, salt)
        key = torch.randint(1, vocab_size, (n, half), generator=g)
        return [{"input_ids": torch.cat([k, k]).tolist(), "loss_from": half} for k in key]

    return TaskData(make(cfg.data.num_train, 3), make(cfg.data.num_eval, 4), "causal_lm")
