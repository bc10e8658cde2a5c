"""The MS-COCO caption tools as tuetschek/e2e-metrics runs them, from the `pycocoevalcap` package (extra [nlg-eval]).

* PTB tokenization: pycocoevalcap's `PTBTokenizer`, i.e. `java -cp stanford-corenlp-3.4.1.jar
  edu.stanford.nlp.process.PTBTokenizer -preserveLines -lowerCase FILE`, then its punctuation list removed — the
  same command line and list as e2e-metrics' bundled copy.
* METEOR: pycocoevalcap's `Meteor`, i.e. `java -jar -Xmx2G meteor-1.5.jar - - -stdio -l en -norm` fed one
  `SCORE ||| ref ... ||| hyp` line per segment and one `EVAL` line (the corpus score from summed statistics),
  with the jar's synonym and paraphrase modules. The jar loads its paraphrase table once (~20 s); one process
  is kept per Python process.
* ROUGE-L and CIDEr: pycocoevalcap's `Rouge` (LCS F with beta 1.2, mean over segments) and `Cider`.

Java is needed for the first two. Without `java` on PATH, `java_available()` is False and callers fall back to
our approximations (`tokenize.coco_tokenize`, `meteor.meteor_exact_stem`), reported under other names.
"""
from __future__ import annotations

import functools
import shutil
from collections.abc import Sequence

from ._common import nlg


def java_available() -> bool:
    return shutil.which("java") is not None


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Each text as the PTB jar tokenizes it (lower-cased, space-separated, punctuation tokens removed).

    Blank texts are not sent to the jar (its line-preserving output would drop trailing blank lines) and come back
    as ""."""
    ptb = nlg("pycocoevalcap.tokenizer.ptbtokenizer")
    keep = [i for i, t in enumerate(texts) if t.strip()]
    out = [""] * len(texts)
    if keep:
        tokens = ptb.PTBTokenizer().tokenize({i: [{"caption": texts[i]}] for i in keep})
        for i in keep:
            out[i] = tokens[i][0]
    return out


@functools.lru_cache(maxsize=1)
def _meteor():
    return nlg("pycocoevalcap.meteor.meteor").Meteor()


def meteor(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus METEOR 1.5 (the official jar, `-l en -norm`) of already tokenized text."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [h] for i, h in enumerate(hypotheses)}
    score, _ = _meteor().compute_score(gts, res)
    return float(score)


def rouge_l(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean segment ROUGE-L (pycocoevalcap `Rouge`) of tokenized text; an empty hypothesis scores 0 (the
    scorer itself divides by its length)."""
    rouge = nlg("pycocoevalcap.rouge.rouge").Rouge()
    scores = [rouge.calc_score([h], list(refs)) if h.split() else 0.0 for h, refs in zip(hypotheses, references)]
    return sum(scores) / len(scores) if scores else 0.0


def cider(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus CIDEr (pycocoevalcap `Cider`, sigma 6) of tokenized text."""
    gts = {i: list(refs) for i, refs in enumerate(references)}
    res = {i: [h] for i, h in enumerate(hypotheses)}
    score, _ = nlg("pycocoevalcap.cider.cider").Cider().compute_score(gts, res)
    return float(score)
