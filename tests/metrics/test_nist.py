import math

import pytest

from bigadapt.metrics.nist import corpus_nist, max_reference_counts, mteval_tokenize


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


def test_clipping_counts():
    assert max_reference_counts([["the", "cat"], ["the", "the", "mat"]], 1)[("the",)] == 2


def test_tokenization_is_sacrebleus_13a_lower_cased():
    # mteval-v13a: punctuation split off except "-" and "'"; "." and "," stay inside numbers; digit-dash split
    assert mteval_tokenize("Hello, world! It's 3.5-star (really) at £ 20.") == [
        "hello", ",", "world", "!", "it's", "3.5", "-", "star", "(", "really", ")", "at", "£", "20", "."]
    assert mteval_tokenize("a &amp; b") == ["a", "&", "b"]
