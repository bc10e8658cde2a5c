"""GLUE metrics (Wang et al. 2019) and the paper's metric for each task (LoRA Table 2).

CoLA: Matthews correlation; STS-B: Pearson and Spearman correlation; MRPC and QQP: accuracy and F1
of the positive class (label 1); MNLI (matched and mismatched scored by separate calls), SST-2,
QNLI, RTE: accuracy. Every value is a fraction (the paper prints x100). Degenerate inputs follow
scikit-learn / scipy: MCC and F1 are 0 when undefined, correlations are NaN when one side is constant.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    p, y = _pair(predictions, labels)
    return float(np.mean(p == y))


def f1(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """Binary F1 of class 1: 2 TP / (2 TP + FP + FN)."""
    p, y = _pair(predictions, labels)
    tp = int(np.sum((p == 1) & (y == 1)))
    wrong = int(np.sum(p != y))
    return 2 * tp / (2 * tp + wrong) if tp else 0.0


def matthews_corrcoef(predictions: Sequence[int], labels: Sequence[int]) -> float:
    """(TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)) for binary labels."""
    p, y = _pair(predictions, labels)
    tp, tn = int(np.sum((p == 1) & (y == 1))), int(np.sum((p != 1) & (y != 1)))
    fp, fn = int(np.sum((p == 1) & (y != 1))), int(np.sum((p != 1) & (y == 1)))
    denominator = math.sqrt((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn))
    return (tp * tn - fp * fn) / denominator if denominator else 0.0


def pearson(predictions: Sequence[float], labels: Sequence[float]) -> float:
    p, y = _pair(predictions, labels, float)
    p, y = p - p.mean(), y - y.mean()
    denominator = math.sqrt(float(np.dot(p, p)) * float(np.dot(y, y)))
    return float(np.dot(p, y)) / denominator if denominator else math.nan


def spearman(predictions: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation of the ranks; tied values share the average of their ranks."""
    p, y = _pair(predictions, labels, float)
    return pearson(average_ranks(p), average_ranks(y))


def average_ranks(values: Sequence[float]) -> np.ndarray:
    """1-based ranks, ties replaced by their mean rank (scipy.stats.rankdata's 'average')."""
    values = np.asarray(values, dtype=float)
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values))
    start = 0
    while start < len(values):
        end = start
        while end + 1 < len(values) and values[order[end + 1]] == values[order[start]]:
            end += 1
        ranks[order[start:end + 1]] = (start + end) / 2 + 1
        start = end + 1
    return ranks


METRICS = {"accuracy": accuracy, "f1": f1, "mcc": matthews_corrcoef, "pearson": pearson, "spearman": spearman}


def glue_metrics(task: str, predictions: Sequence[float], labels: Sequence[float]) -> dict[str, float]:
    """The paper's metrics for `task` (see `bigadapt.data.glue.GLUE_TASKS`), e.g. {"accuracy": .., "f1": ..}."""
    from bigadapt.data.glue import glue_task  # here: importing bigadapt.data loads torch

    return {name: METRICS[name](predictions, labels) for name in glue_task(task).metrics}


def _pair(predictions, labels, dtype=int) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(predictions, dtype=dtype), np.asarray(labels, dtype=dtype)
    if p.shape != y.shape or p.ndim != 1:
        raise ValueError(f"predictions {p.shape} and labels {y.shape} must be 1-D and the same length")
    if len(p) == 0:
        raise ValueError("no predictions to score")
    return p, y
