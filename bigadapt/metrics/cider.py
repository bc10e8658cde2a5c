"""CIDEr-D as pycocoevalcap's `Cider` computes it (the E2E CIDEr; Vedantam et al. 2015).

For n = 1..4, every sentence becomes a vector of n-gram tf-idf weights, tf = raw count and
idf = log(N) - log(max(1, df)), with N the number of segments in the evaluated set and df the
number of segments whose references contain the n-gram (so the idf comes from the references of
the set being scored, not from a fixed corpus). The similarity to one reference is
sum_g min(h_g, r_g) * r_g / (|h| |r|) (clipped cosine), times exp(-(l_h - l_r)^2 / (2 * 6^2)).
A segment scores 10 * mean over n of the mean over references; the corpus score is the mean.
With a single segment every idf is 0 and so is the score, as in pycocoevalcap.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Sequence

from .bleu import _check_aligned, ngram_counts
from .tokenize import coco_tokenize

SIGMA = 6.0
MAX_N = 4


def cider_d(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
            tokenize: Callable[[str], list[str]] = coco_tokenize) -> float:
    """Corpus CIDEr-D (x10 scale, e.g. 2.53 on E2E); `references[i]` holds all references of `hypotheses[i]`."""
    _check_aligned(hypotheses, references)
    hyp_counts = [_counts(tokenize(h)) for h in hypotheses]
    ref_counts = [[_counts(tokenize(r)) for r in refs] for refs in references]
    document_frequency: Counter = Counter()
    for refs in ref_counts:
        document_frequency.update({gram for counts in refs for gram in counts})
    log_n = math.log(len(hypotheses)) if hypotheses else 0.0

    def vector(counts: Counter):
        return _tfidf(counts, document_frequency, log_n)

    scores = []
    for hyp, refs in zip(hyp_counts, ref_counts):
        hyp_vec = vector(hyp)
        similarity = [0.0] * MAX_N
        for ref in refs:
            for n, value in enumerate(_similarity(hyp_vec, vector(ref))):
                similarity[n] += value
        scores.append(10.0 * sum(similarity) / MAX_N / len(refs))
    return sum(scores) / len(scores) if scores else 0.0


def _counts(tokens: list[str]) -> Counter:
    counts: Counter = Counter()
    for n in range(1, MAX_N + 1):
        counts.update(ngram_counts(tokens, n))
    return counts


def _tfidf(counts: Counter, document_frequency: Counter, log_n: float):
    """Per-order weight dicts, their norms, and the length pycocoevalcap uses (the bigram count)."""
    vectors: list[dict] = [{} for _ in range(MAX_N)]
    for gram, tf in counts.items():
        vectors[len(gram) - 1][gram] = tf * (log_n - math.log(max(1.0, document_frequency[gram])))
    norms = [math.sqrt(sum(w * w for w in v.values())) for v in vectors]
    # pycocoevalcap counts `length` while filling order index 1: the number of bigrams (len - 1).
    length = sum(tf for gram, tf in counts.items() if len(gram) == 2)
    return vectors, norms, length


def _similarity(hyp, ref) -> list[float]:
    (hyp_vecs, hyp_norms, hyp_len), (ref_vecs, ref_norms, ref_len) = hyp, ref
    penalty = math.exp(-((hyp_len - ref_len) ** 2) / (2 * SIGMA ** 2))
    values = []
    for h, r, hn, rn in zip(hyp_vecs, ref_vecs, hyp_norms, ref_norms):
        value = sum(min(w, r[g]) * r[g] for g, w in h.items() if g in r)
        if hn and rn:
            value /= hn * rn
        values.append(value * penalty)
    return values
