"""SAMSum ROUGE-1/2/L (LoRA Table 15) from Google's `rouge-score` package (extra [nlg-eval])."""
from __future__ import annotations

from collections.abc import Sequence

from ._common import nlg

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def rouge_scores(predictions: Sequence[str], targets: Sequence[str], use_stemmer: bool = False) -> dict[str, float]:
    """Mean F1 of ROUGE-1, ROUGE-2 and ROUGE-L (summary-level LCS, not rougeLsum) over (prediction, target) pairs,
    each in [0, 1]."""
    if len(predictions) != len(targets):
        raise ValueError(f"{len(predictions)} predictions but {len(targets)} targets")
    scorer = nlg("rouge_score.rouge_scorer").RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    totals = dict.fromkeys(ROUGE_TYPES, 0.0)
    for prediction, target in zip(predictions, targets):
        for name, score in scorer.score(target, prediction).items():
            totals[name] += score.fmeasure
    return {name: total / len(predictions) if predictions else 0.0 for name, total in totals.items()}
