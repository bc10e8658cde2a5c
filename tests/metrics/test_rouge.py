import pytest

from bigadapt.metrics.rouge import lcs_length, rouge_l_coco, rouge_scores, rouge_tokenize


def test_lcs():
    assert lcs_length("a b c d e".split(), "a c e x".split()) == 3
    assert lcs_length([], ["a"]) == 0


def test_coco_rouge_l_maximises_precision_and_recall_separately():
    # hyp a b c d; ref "a c d e f": LCS 3 -> P 3/4, R 3/5; ref "b c": LCS 2 -> P 2/4, R 1
    # pycocoevalcap takes max P = 0.75 and max R = 1.0, then F = (1 + 1.2^2) P R / (R + 1.2^2 P)
    expected = 2.44 * 0.75 * 1.0 / (1.0 + 1.44 * 0.75)
    assert rouge_l_coco(["a b c d"], [["a c d e f", "b c"]], tokenize=str.split) == pytest.approx(expected)
    assert rouge_l_coco(["a b c d", "x"], [["a b c d"], ["y"]], tokenize=str.split) == pytest.approx(0.5)


def test_coco_rouge_l_identity():
    assert rouge_l_coco(["The cat sat on the mat ."], [["the cat sat on the mat"]]) == pytest.approx(1.0)


def test_rouge_scores_by_hand():
    # tokens: the cat sat on the mat / the cat is on the mat
    # ROUGE-1: overlap the x2, cat, on, mat = 5 of 6 each side; ROUGE-2: the cat, on the, the mat = 3 of 5;
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6
    scores = rouge_scores(["The cat sat on the mat."], ["the cat is on the mat"])
    assert scores == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5), "rougeL": pytest.approx(5 / 6)}


def test_rouge_score_tokenizer_and_stemming():
    assert rouge_tokenize("Don't stop-believing!") == ["don", "t", "stop", "believing"]
    # stemming applies to words longer than 3 characters: cats -> cat, running/runs -> run
    assert rouge_scores(["cats running"], ["cat runs"])["rouge1"] == 0.0
    assert rouge_scores(["cats running"], ["cat runs"], use_stemmer=True)["rouge1"] == pytest.approx(1.0)
