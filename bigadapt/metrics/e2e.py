"""The E2E NLG Challenge metrics, as microsoft/LoRA gets them (`measure_scores.py -p` of tuetschek/e2e-metrics).

BLEU and NIST follow pymteval (mteval-v13a); METEOR, ROUGE-L and CIDEr follow the MS-COCO caption
code on PTB-style tokens. Units are those of the paper's Table 18: BLEU x100 (70.4), NIST as is
(8.85), METEOR and ROUGE-L as fractions (0.46, 0.71; Table 3 prints these two x100 as well),
CIDEr as is (2.53). METEOR here lacks the synonym and paraphrase modules and runs lower than the
official jar (see `bigadapt.metrics.meteor`).
"""
from __future__ import annotations

from collections.abc import Sequence

from .bleu import corpus_bleu
from .cider import cider_d
from .meteor import meteor
from .nist import corpus_nist
from .rouge import rouge_l_coco


def e2e_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}; `references[i]` holds all references of `hypotheses[i]`.

    Group the references of each MR with `bigadapt.data.e2e.group_references`.
    """
    return {
        "BLEU": 100.0 * corpus_bleu(hypotheses, references),
        "NIST": corpus_nist(hypotheses, references),
        "METEOR": meteor(hypotheses, references),
        "ROUGE_L": rouge_l_coco(hypotheses, references),
        "CIDEr": cider_d(hypotheses, references),
    }
