"""ROUGE in the two flavours the LoRA paper's tasks use.

* `rouge_l_coco`: ROUGE-L of the MS-COCO caption code (pycocoevalcap `Rouge`), the E2E ROUGE_L.
  Per segment, precision and recall of the longest common subsequence are each maximised over
  the references *separately*, then F = (1 + b^2) P R / (R + b^2 P) with b = 1.2; the corpus score is
  the mean over segments. Text is tokenized by `coco_tokenize`.
* `rouge_scores`: ROUGE-1/2/L F1 as Google's `rouge-score` package computes them (the usual SAMSum
  numbers): lowercase, words are runs of ASCII letters and digits, mean of per-summary F1. With
  `use_stemmer=True` words longer than 3 characters are Porter-stemmed; rouge-score uses NLTK's
  PorterStemmer in its default NLTK_EXTENSIONS mode, this uses the original Porter algorithm
  (snowballstemmer "porter"), which stems ~1.5% of English word types differently (e.g. "lies",
  "dying"), so stemmed scores can differ slightly. ROUGE-L is summary-level LCS ("rougeL", not
  the newline-split "rougeLsum").
"""
from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from functools import lru_cache

import snowballstemmer

from .bleu import _check_aligned, ngram_counts
from .tokenize import coco_tokenize

COCO_BETA = 1.2
_ROUGE_WORD_CHARS = frozenset(string.ascii_lowercase + string.digits)
_PORTER = snowballstemmer.stemmer("porter")


@lru_cache(maxsize=1 << 16)
def _stem(word: str) -> str:
    return _PORTER.stemWord(word)


def lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
    """Length of the longest common subsequence (one DP row at a time)."""
    row = [0] * (len(b) + 1)
    for x in a:
        diagonal = 0
        for j, y in enumerate(b, start=1):
            diagonal, row[j] = row[j], diagonal + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def rouge_l_coco(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                 tokenize: Callable[[str], list[str]] = coco_tokenize) -> float:
    """Mean sentence-level ROUGE-L F (beta 1.2) in [0, 1], as pycocoevalcap computes it."""
    _check_aligned(hypotheses, references)
    scores = [_coco_sentence(tokenize(h), [tokenize(r) for r in refs]) for h, refs in zip(hypotheses, references)]
    return sum(scores) / len(scores) if scores else 0.0


def _coco_sentence(hyp: list[str], refs: list[list[str]]) -> float:
    if not hyp:
        return 0.0
    lcs = [lcs_length(ref, hyp) for ref in refs]
    precision = max(n / len(hyp) for n in lcs)
    recall = max(n / len(ref) if ref else 0.0 for n, ref in zip(lcs, refs))
    if precision == 0 or recall == 0:
        return 0.0
    return (1 + COCO_BETA ** 2) * precision * recall / (recall + COCO_BETA ** 2 * precision)


def rouge_tokenize(text: str, use_stemmer: bool = False) -> list[str]:
    """rouge-score's tokenization: lowercase; words are the maximal runs of ASCII letters and digits
    (any other character separates words); optionally stem words longer than 3 characters."""
    tokens = "".join(c if c in _ROUGE_WORD_CHARS else " " for c in text.lower()).split()
    if use_stemmer:
        tokens = [_stem(t) if len(t) > 3 else t for t in tokens]
    return tokens


def rouge_scores(predictions: Sequence[str], targets: Sequence[str], use_stemmer: bool = False) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L over (prediction, target) pairs, each in [0, 1]."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    totals = {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}
    for prediction, target in zip(predictions, targets):
        pred, ref = rouge_tokenize(prediction, use_stemmer), rouge_tokenize(target, use_stemmer)
        totals["rouge1"] += _ngram_f1(pred, ref, 1)
        totals["rouge2"] += _ngram_f1(pred, ref, 2)
        totals["rougeL"] += _f1(lcs_length(ref, pred), len(pred), len(ref))
    return {name: total / len(predictions) if predictions else 0.0 for name, total in totals.items()}


def _ngram_f1(pred: list[str], ref: list[str], n: int) -> float:
    pred_counts, ref_counts = ngram_counts(pred, n), ngram_counts(ref, n)
    overlap = sum((pred_counts & ref_counts).values())
    return _f1(overlap, sum(pred_counts.values()), sum(ref_counts.values()))


def _f1(overlap: int, pred_total: int, ref_total: int) -> float:
    precision, recall = overlap / max(pred_total, 1), overlap / max(ref_total, 1)
    return 2 * precision * recall / (precision + recall) if precision + recall > 0 else 0.0
