"""Evaluation metrics of the tasks in the LoRA paper, from the tools the field uses.

GLUE and WikiSQL need nothing optional. The generation metrics (E2E, WebNLG, DART, SAMSum) come from the
[nlg-eval] extra — sacrebleu, rouge-score, pyter3, pycocoevalcap (its meteor-1.5 and Stanford PTB jars run with
Java), nltk — and are imported on first use, so a missing extra is a one-line error naming it.
"""
from .glue import accuracy, f1, glue_metrics, matthews_corrcoef, pearson, spearman
from .wikisql import logical_form_accuracy


def e2e_metrics(hypotheses, references, java=None):
    from .e2e import e2e_metrics as run
    return run(hypotheses, references, java)


def data2text_metrics(hypotheses, references, java=None):
    from .data2text import data2text_metrics as run
    return run(hypotheses, references, java)


def rouge_scores(predictions, targets, use_stemmer=False):
    from .summarization import rouge_scores as run
    return run(predictions, targets, use_stemmer)


__all__ = [
    "accuracy", "data2text_metrics", "e2e_metrics", "f1", "glue_metrics", "logical_form_accuracy",
    "matthews_corrcoef", "pearson", "rouge_scores", "spearman",
]
