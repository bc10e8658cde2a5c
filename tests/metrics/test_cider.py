import math

import pytest

from bigadapt.metrics.cider import cider_d


def test_cider_d_by_hand():
    # N = 2 segments, every reference n-gram has df 1 (and unseen ones df max(1, 0) = 1): every weight is tf * ln 2.
    # segment 1, "a b" vs "a b": cosine 1 for 1-grams and 2-grams, 0 for 3/4-grams (empty); equal bigram
    #   counts -> no length penalty; score 10 * (1 + 1 + 0 + 0) / 4 = 5
    # segment 2, "c d" vs "c e": 1-grams share "c": ln2^2 / (sqrt(2) ln2 * sqrt(2) ln2) = 0.5; bigrams 0
    #   score 10 * 0.5 / 4 = 1.25;  corpus mean (5 + 1.25) / 2
    assert cider_d(["a b", "c d"], [["a b"], ["c e"]], tokenize=str.split) == pytest.approx(3.125)


def test_cider_d_length_penalty_and_reference_average():
    # "a b" against refs "a b" and "a b c": df(a) = df(b) = df(a b) = 1... with a second segment to make idf > 0.
    # Only the per-reference average and the gaussian penalty matter here: second ref is one token longer.
    with_long = cider_d(["a b", "z"], [["a b", "a b c"], ["y"]], tokenize=str.split)
    alone = cider_d(["a b", "z"], [["a b"], ["y"]], tokenize=str.split)
    assert with_long < alone
    assert alone == pytest.approx(5.0 / 2)


def test_single_segment_scores_zero_as_in_pycocoevalcap():
    # idf = log(1) - log(1) = 0 for every n-gram
    assert cider_d(["a b c"], [["a b c"]], tokenize=str.split) == 0.0
    assert math.isfinite(cider_d([], []))
