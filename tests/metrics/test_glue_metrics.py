import math

import pytest

from bigadapt.metrics.glue import accuracy, average_ranks, f1, glue_metrics, matthews_corrcoef, pearson, spearman

# Confusion matrix TP=6, FN=2, FP=1, TN=3 (12 examples).
LABELS = [1] * 8 + [0] * 4
PREDICTIONS = [1] * 6 + [0] * 2 + [1] * 1 + [0] * 3


def test_binary_metrics_on_a_confusion_matrix():
    assert accuracy(PREDICTIONS, LABELS) == pytest.approx(9 / 12)  # (TP + TN) / n
    assert f1(PREDICTIONS, LABELS) == pytest.approx(12 / 15)  # 2TP / (2TP + FP + FN) = 12 / 15
    # MCC = (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = (18 - 2) / sqrt(7*8*4*5) = 16 / sqrt(1120)
    assert matthews_corrcoef(PREDICTIONS, LABELS) == pytest.approx(16 / math.sqrt(1120))
    assert matthews_corrcoef(PREDICTIONS, LABELS) == pytest.approx(0.4780914)


def test_degenerate_cases_follow_sklearn_and_scipy():
    assert matthews_corrcoef([1, 1, 1], [1, 0, 1]) == 0.0  # a constant predictor has MCC 0
    assert f1([0, 0], [0, 0]) == 0.0  # no positive anywhere: F1 defined as 0
    assert math.isnan(pearson([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))
    with pytest.raises(ValueError, match="same length"):
        accuracy([1, 0], [1])


def test_correlations_by_hand():
    # x = 1,2,3,4 (mean 2.5), y = 2,4,6,9 (mean 5.25):
    # sum dx*dy = (-1.5)(-3.25) + (-0.5)(-1.25) + (0.5)(0.75) + (1.5)(3.75) = 11.5
    # sum dx^2 = 5, sum dy^2 = 10.5625 + 1.5625 + 0.5625 + 14.0625 = 26.75
    assert pearson([1, 2, 3, 4], [2, 4, 6, 9]) == pytest.approx(11.5 / math.sqrt(5 * 26.75))
    # ties share ranks: x = 1,2,2,3 -> 1, 2.5, 2.5, 4; y ranks 1,3,2,4; Pearson of ranks = 4.5 / sqrt(4.5 * 5)
    assert average_ranks([1, 2, 2, 3]).tolist() == [1, 2.5, 2.5, 4]
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(22.5))
    assert spearman([1, 2, 3, 4], [10, 20, 30, 1000]) == pytest.approx(1.0)  # any monotone map


def test_against_scipy_and_sklearn_when_installed():
    stats = pytest.importorskip("scipy.stats")
    x, y = [0.1, 2.5, 2.5, 3.0, 4.7, 4.7, 4.7, 1.0], [0.0, 2.0, 3.5, 3.5, 5.0, 4.0, 4.5, 0.5]
    assert pearson(x, y) == pytest.approx(stats.pearsonr(x, y)[0])
    assert spearman(x, y) == pytest.approx(stats.spearmanr(x, y)[0])
    sklearn = pytest.importorskip("sklearn.metrics")
    assert matthews_corrcoef(PREDICTIONS, LABELS) == pytest.approx(sklearn.matthews_corrcoef(LABELS, PREDICTIONS))
    assert f1(PREDICTIONS, LABELS) == pytest.approx(sklearn.f1_score(LABELS, PREDICTIONS))


def test_paper_metric_per_task():
    assert glue_metrics("CoLA", PREDICTIONS, LABELS) == {"mcc": pytest.approx(0.4780914)}
    assert set(glue_metrics("mrpc", PREDICTIONS, LABELS)) == {"accuracy", "f1"}
    assert set(glue_metrics("qqp", PREDICTIONS, LABELS)) == {"accuracy", "f1"}
    assert set(glue_metrics("STS-B", [1.0, 2.0, 3.5], [1.5, 2.0, 3.0])) == {"pearson", "spearman"}
    for task in ("mnli", "sst2", "qnli", "rte"):
        assert glue_metrics(task, [0, 1, 2], [0, 1, 1]) == {"accuracy": pytest.approx(2 / 3)}
