"""Corpus BLEU with multiple references, as mteval-v13a and the E2E script (`pymteval.BLEUScore`) compute it.

Per segment: n-gram counts (n = 1..4) of the hypothesis are clipped by the maximum count of that
n-gram in any one reference; the reference length is that of the reference closest in length to
the hypothesis (the shorter one on a tie). Clipped counts, hypothesis n-gram totals and reference
lengths are summed over the corpus, then

    BLEU = BP * exp(mean_n log p_n),  p_n = hits_n / total_n,  BP = min(1, exp(1 - ref_len / hyp_len)).

Text is tokenized by `mteval_tokenize` (mteval's NormalizeText, case-insensitive). The result is a
fraction in [0, 1], as the E2E script prints it; the LoRA paper prints it x100.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from .tokenize import mteval_tokenize

# pymteval keeps log() defined when an order has no hit (BLEU ~ 0 rather than an error).
_TINY = 1e-15
_SMALL = 1e-9


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def max_reference_counts(references: Sequence[Sequence[str]], n: int) -> Counter:
    """For each n-gram, its largest count in any single reference (the clipping bound)."""
    merged: Counter = Counter()
    for reference in references:
        merged |= ngram_counts(reference, n)
    return merged


def corpus_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 4,
                tokenize: Callable[[str], list[str]] = mteval_tokenize) -> float:
    """BLEU of a corpus; `references[i]` holds all references of `hypotheses[i]`."""
    _check_aligned(hypotheses, references)
    hits, totals, ref_len = [0] * max_n, [0] * max_n, 0
    for hypothesis, refs in zip(hypotheses, references):
        hyp = tokenize(hypothesis)
        toks = [tokenize(r) for r in refs]
        for n in range(1, max_n + 1):
            clip = max_reference_counts(toks, n)
            hits[n - 1] += sum(min(c, clip[g]) for g, c in ngram_counts(hyp, n).items())
            totals[n - 1] += max(len(hyp) - n + 1, 0)
        ref_len += len(min(toks, key=lambda r: (abs(len(r) - len(hyp)), len(r))))
    log_precision = sum(math.log(max(h, _TINY) / max(t, _SMALL)) for h, t in zip(hits, totals)) / max_n
    hyp_len = totals[0]
    brevity = 1.0 if hyp_len > ref_len else math.exp(1.0 - ref_len / max(hyp_len, 1e-5))
    return brevity * math.exp(log_precision)


def _check_aligned(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> None:
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference sets")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")
