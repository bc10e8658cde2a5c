import math

import pytest

from bigadapt.metrics.bleu import corpus_bleu, max_reference_counts
from bigadapt.metrics.nist import corpus_nist

HYP = "the quick brown fox jumps over the dog"  # 8 tokens
REF = "the quick brown fox jumped over the lazy dog"  # 9 tokens


def test_bleu_by_hand():
    # clipped precisions: 1-grams 7/8 (all but "jumps"), 2-grams 4/7 (the quick, quick brown,
    # brown fox, over the), 3-grams 2/6 (the quick brown, quick brown fox), 4-grams 1/5
    # brevity penalty exp(1 - 9/8); BLEU = exp(-1/8) * (7/8 * 4/7 * 2/6 * 1/5) ** (1/4) = exp(-1/8) * (1/30) ** (1/4)
    assert corpus_bleu([HYP], [[REF]]) == pytest.approx(math.exp(-0.125) * (1 / 30) ** 0.25)
    assert corpus_bleu([HYP], [[REF]]) == pytest.approx(0.3770795, rel=1e-6)


def test_bleu_clipping_and_closest_reference_length():
    refs = [["the", "cat"], ["the", "the", "mat", "is", "here"]]
    assert max_reference_counts(refs, 1)[("the",)] == 2  # clipped by the largest count in one reference
    # "the the the": unigram hits min(3, 2) = 2; reference lengths 2 and 5 -> closest to 3 is 2 (no penalty)
    hits_only = corpus_bleu(["the the the"], [["the cat", "the the mat is here"]], max_n=1)
    assert hits_only == pytest.approx(2 / 3)
    # a 4-token hypothesis between references of 3 and 5 tokens takes the shorter (3): no penalty,
    # where the longer one would give exp(1 - 5/4); all 4 unigrams occur in the second reference
    assert corpus_bleu(["a b c d"], [["a b c", "a b c d e"]], max_n=1) == pytest.approx(1.0)


def test_bleu_identity_and_case():
    assert corpus_bleu(["The Vaults is a pub ."], [["the vaults is a pub ."]]) == pytest.approx(1.0)
    assert corpus_bleu([HYP, REF], [[REF], [REF, HYP]]) < 1.0


def test_nist_by_hand():
    # reference counts: () 3 words, a b c once each, "a b" once
    # -> info(a) = info(b) = log2(3/1), info(a b) = log2(count(a) / count(a b)) = log2(1/1) = 0
    # 1-grams: (info(a) + info(b)) / 2 = log2(3); 2-grams: 0 / 1; no 3..5-grams in a 2-word hypothesis
    # length ratio 2/3 -> penalty exp(-beta log(2/3)^2) = 0.5 by the choice of beta
    assert corpus_nist(["a b"], [["a b c"]]) == pytest.approx(0.5 * math.log2(3))


def test_nist_information_weights_span_the_corpus():
    # "a" occurs in the references of both segments: count(a) = 2 of 6 words -> info(a) = log2(6/2)
    # segment hits: a in each, "b" and "d" once each (info log2 6), hypothesis unigram total 4, nothing else matches
    score = corpus_nist(["a b", "a d"], [["a b c"], ["a d e"]])
    unigrams = (2 * math.log2(3) + 2 * math.log2(6)) / 4
    # bigrams a b, a d: info = log2(count(a) / count(a b)) = log2(2 / 1) = 1 each, over 2 hypothesis bigrams
    assert score == pytest.approx(0.5 * (unigrams + 1.0))
