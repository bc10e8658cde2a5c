import pytest

from bigadapt.metrics import rouge_scores


def test_rouge_scores_by_hand():
    # tokens: the cat sat on the mat / the cat is on the mat
    # ROUGE-1: overlap the x2, cat, on, mat = 5 of 6 each side; ROUGE-2: the cat, on the, the mat = 3 of 5;
    # ROUGE-L: LCS "the cat on the mat" = 5 of 6
    scores = rouge_scores(["The cat sat on the mat."], ["the cat is on the mat"])
    assert scores == {"rouge1": pytest.approx(5 / 6), "rouge2": pytest.approx(3 / 5), "rougeL": pytest.approx(5 / 6)}


def test_stemming_is_rouge_scores_porter():
    # words longer than 3 characters are stemmed: cats -> cat, running/runs -> run
    assert rouge_scores(["cats running"], ["cat runs"])["rouge1"] == 0.0
    assert rouge_scores(["cats running"], ["cat runs"], use_stemmer=True)["rouge1"] == pytest.approx(1.0)
