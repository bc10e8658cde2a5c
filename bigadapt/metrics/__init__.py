"""Evaluation metrics of the tasks in the LoRA paper, each computed the way its official script does."""
from .bleu import corpus_bleu
from .cider import cider_d
from .e2e import e2e_metrics
from .glue import accuracy, f1, glue_metrics, matthews_corrcoef, pearson, spearman
from .meteor import meteor
from .nist import corpus_nist
from .rouge import rouge_l_coco, rouge_scores
from .ter import corpus_ter
from .wikisql import logical_form_accuracy

__all__ = [
    "accuracy", "cider_d", "corpus_bleu", "corpus_nist", "corpus_ter", "e2e_metrics", "f1", "glue_metrics",
    "logical_form_accuracy", "matthews_corrcoef", "meteor", "pearson", "rouge_l_coco", "rouge_scores", "spearman",
]
