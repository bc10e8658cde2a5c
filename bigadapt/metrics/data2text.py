"""WebNLG and DART metrics (LoRA Tables 13, 14), as the WebNLG challenge's GenerationEval (`eval.py`) computes them.

* BLEU: sacrebleu's corpus BLEU, 13a tokenizer, case-sensitive (GenerationEval runs multi-bleu-detok.perl, which
  tokenizes like mteval-v13a), x100.
* METEOR: the official meteor-1.5 jar with `-l en -norm` (pycocoevalcap's wrapper, `coco.meteor`) on NLTK word
  tokens, all references of a segment at once; without Java our approximation, keyed `METEOR_exact_stem`.
* TER_segment_mean: the paper's TER. GenerationEval scores each segment with pyter (`pyter.ter(hyp, ref)` on
  whitespace-split NLTK tokens), takes the best reference, and averages over segments. pyter3 computes it.
* TER_corpus: sacrebleu's corpus TER (Tercom: total edits over total average reference length), as a fraction.
  The two definitions differ (0.516 vs 0.485 on the same text): compare with the paper's tables only the first.

Tokenization: GenerationEval uses `nltk.word_tokenize`, which splits sentences with the Punkt model first; Punkt's
data is a download that these machines cannot fetch, so we run NLTK's word tokenizer (`NLTKWordTokenizer`, the same
Treebank rules) on the whole text. The difference: a sentence-final "." inside a multi-sentence text stays attached
to its word here ("Paris. It" gives "Paris." "It") where Punkt would split it off.
"""
from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

from . import coco
from ._common import check_aligned, nlg, reference_streams


@lru_cache(maxsize=1)
def _word_tokenizer():
    return nlg("nltk.tokenize").NLTKWordTokenizer()


def word_tokenize(text: str) -> str:
    """NLTK's Treebank word tokens of `text`, joined by spaces (see module doc on sentence splitting)."""
    return " ".join(_word_tokenizer().tokenize(text))


def ter_segment_mean(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """GenerationEval's TER: mean over segments of the lowest pyter TER against any reference (inputs tokenized;
    an empty reference, or one pyter fails on, scores 1 as there)."""
    pyter = nlg("pyter")
    scores = []
    for hyp, refs in zip(hypotheses, references):
        candidates = []
        for ref in refs:
            try:
                candidates.append(pyter.ter(hyp.split(), ref.split()) if ref else 1.0)
            except Exception:  # GenerationEval's own rule: a segment pyter cannot score counts as 1
                candidates.append(1.0)
        scores.append(min(candidates))
    return sum(scores) / len(scores) if scores else 0.0


def ter_corpus(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """sacrebleu's corpus TER as a fraction (default tokenization: whitespace, case-sensitive)."""
    sacrebleu = nlg("sacrebleu")
    return float(sacrebleu.corpus_ter(list(hypotheses), reference_streams(references)).score) / 100.0


def data2text_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]],
                      java: bool | None = None) -> dict[str, float]:
    """{"BLEU", "METEOR" (or "METEOR_exact_stem" without Java), "TER_segment_mean", "TER_corpus"}."""
    check_aligned(hypotheses, references)
    sacrebleu = nlg("sacrebleu")
    java = coco.java_available() if java is None else java
    hyp_tok = [word_tokenize(h) for h in hypotheses]
    ref_tok = [[word_tokenize(r) for r in refs] for refs in references]
    out = {"BLEU": float(sacrebleu.corpus_bleu(list(hypotheses), reference_streams(references)).score)}
    if java:
        out["METEOR"] = coco.meteor(hyp_tok, ref_tok)
    else:
        from .meteor import meteor_exact_stem
        out["METEOR_exact_stem"] = meteor_exact_stem(hyp_tok, ref_tok)
    out["TER_segment_mean"] = ter_segment_mean(hyp_tok, ref_tok)
    out["TER_corpus"] = ter_corpus(hypotheses, references)
    return out
