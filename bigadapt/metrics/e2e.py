"""The E2E NLG Challenge metrics, as microsoft/LoRA gets them (`measure_scores.py -p` of tuetschek/e2e-metrics).

* BLEU: sacrebleu's corpus BLEU with its 13a tokenizer (mteval-v13a's NormalizeText), lower-cased: what pymteval
  computes (closest reference length, multiple references).
* NIST: ours (`nist.py`, the mteval-v13a formula on the same tokens): no package computes it.
* METEOR, ROUGE_L, CIDEr: pycocoevalcap's wrappers (`coco.py`) on the PTB jar's tokens — the official meteor-1.5
  jar with its synonym and paraphrase modules, pycocoevalcap's `Rouge` and `Cider`.

Units are those of the paper's Table 18: BLEU x100 (70.4), NIST as is (8.85), METEOR and ROUGE-L as fractions
(0.46, 0.71), CIDEr as is (2.53).

Without Java (`coco.java_available()` False) the PTB tokens come from `tokenize.coco_tokenize` and METEOR from our
exact+stem approximation, reported as `METEOR_exact_stem` (not "METEOR": it runs lower than the jar).
"""
from __future__ import annotations

from collections.abc import Sequence

from . import coco
from ._common import check_aligned, nlg, reference_streams
from .nist import corpus_nist


def e2e_bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """pymteval's BLEU (x100): sacrebleu 13a, case-insensitive."""
    sacrebleu = nlg("sacrebleu")
    return float(sacrebleu.corpus_bleu(list(hypotheses), reference_streams(references), lowercase=True).score)


def e2e_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                java: bool | None = None) -> dict[str, float]:
    """{"BLEU", "NIST", "METEOR", "ROUGE_L", "CIDEr"}; `references[i]` holds all references of `hypotheses[i]`.

    Group the references of each MR with `bigadapt.data.e2e.group_references`. `java`: None (use it when `java`
    is on PATH), or force True/False; without it the METEOR key is `METEOR_exact_stem`.
    """
    check_aligned(hypotheses, references)
    java = coco.java_available() if java is None else java
    out = {"BLEU": e2e_bleu(hypotheses, references), "NIST": corpus_nist(hypotheses, references)}
    sizes = [len(refs) for refs in references]
    if java:
        hyp_tok, flat = coco.ptb_tokenize(hypotheses), coco.ptb_tokenize([r for refs in references for r in refs])
        out["METEOR"] = coco.meteor(hyp_tok, _regroup(flat, sizes))
    else:
        from .meteor import meteor_exact_stem
        from .tokenize import coco_tokenize
        hyp_tok = [" ".join(coco_tokenize(h)) for h in hypotheses]
        flat = [" ".join(coco_tokenize(r)) for refs in references for r in refs]
        out["METEOR_exact_stem"] = meteor_exact_stem(hypotheses, references)
    ref_tok = _regroup(flat, sizes)
    out["ROUGE_L"] = coco.rouge_l(hyp_tok, ref_tok)
    out["CIDEr"] = coco.cider(hyp_tok, ref_tok)
    return out


def _regroup(flat: list[str], sizes: list[int]) -> list[list[str]]:
    out, k = [], 0
    for n in sizes:
        out.append(flat[k:k + n])
        k += n
    return out
