"""NIST (Doddington 2002) as the E2E script computes it (`pymteval.NISTScore`, the mteval-v13a formula).

Information weights come from the references of the evaluated set itself:
info(w_1..w_n) = log2(count(w_1..w_{n-1}) / count(w_1..w_n)), counted over every reference
sentence, with count() of the empty prefix = total number of reference words. Then

    NIST = BP * sum_{n=1..5} (sum of info over clipped matching hypothesis n-grams) / (hypothesis n-grams),
    BP = exp(-beta * log(min(1, L_hyp / L_ref))^2),  beta = -log(0.5) / log(1.5)^2,

where L_ref sums each segment's *average* reference length (so BP = 0.5 at a 2/3 length ratio).
Tokenization is mteval-v13a's NormalizeText as sacrebleu implements it (`Tokenizer13a`), lower-cased, as for
the E2E BLEU. No maintained package computes this formula: nltk's `corpus_nist` weighs information differently
(5.17 where mteval gives 5.51 on the same text), so this module stays ours; its test pins e2e-metrics' numbers.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence
from functools import lru_cache

from ._common import check_aligned, nlg

_BETA = -math.log(0.5) / math.log(1.5) ** 2


def corpus_nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]], max_n: int = 5,
                tokenize: Callable[[str], list[str]] | None = None) -> float:
    """NIST of a corpus; `references[i]` holds all references of `hypotheses[i]`."""
    check_aligned(hypotheses, references)
    tokenize = tokenize or mteval_tokenize
    hyps = [tokenize(h) for h in hypotheses]
    refs = [[tokenize(r) for r in rs] for rs in references]
    counts = _reference_ngram_counts(refs, max_n)
    gain, totals = [0.0] * max_n, [0] * max_n
    for hyp, toks in zip(hyps, refs):
        for n in range(1, max_n + 1):
            clip = max_reference_counts(toks, n)
            for gram, c in ngram_counts(hyp, n).items():
                if clip[gram]:
                    gain[n - 1] += min(c, clip[gram]) * math.log2(counts[gram[:-1]] / counts[gram])
            totals[n - 1] += max(len(hyp) - n + 1, 0)
    score = sum(g / t for g, t in zip(gain, totals) if t)
    avg_ref_len = sum(sum(len(r) for r in toks) / len(toks) for toks in refs)
    return score * _length_penalty(totals[0] / avg_ref_len if avg_ref_len else 1.0)


def mteval_tokenize(text: str) -> list[str]:
    """mteval-v13a's NormalizeText (sacrebleu's 13a tokenizer), lower-cased: pymteval matches case-insensitively."""
    return _tokenizer_13a()(text.lower()).split()


@lru_cache(maxsize=1)
def _tokenizer_13a():
    return nlg("sacrebleu.tokenizers.tokenizer_13a").Tokenizer13a()


def ngram_counts(tokens: Sequence[str], n: int) -> Counter:
    return Counter(tuple(tokens[i:i + n]) for i in range(len(tokens) - n + 1))


def max_reference_counts(references: Sequence[Sequence[str]], n: int) -> Counter:
    """For each n-gram, its largest count in any single reference (the clipping bound)."""
    merged: Counter = Counter()
    for reference in references:
        merged |= ngram_counts(reference, n)
    return merged


def _reference_ngram_counts(refs: list[list[list[str]]], max_n: int) -> Counter:
    """n-gram counts over all reference sentences; the empty tuple counts all reference words."""
    counts: Counter = Counter()
    for toks in refs:
        for ref in toks:
            counts[()] += len(ref)
            for n in range(1, max_n + 1):
                counts.update(ngram_counts(ref, n))
    return counts


def _length_penalty(ratio: float) -> float:
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-_BETA * math.log(ratio) ** 2)
