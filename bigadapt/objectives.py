"""Losses as sums over loss terms, so a step's loss is (sum over the global batch) / (its term count)
whatever the micro-batch split and world size — the same optimisation on 1 rank or 64."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .data.batching import IGNORE


def loss_sum(logits: torch.Tensor, labels: torch.Tensor, objective: str, smoothing: float = 0.0) -> torch.Tensor:
    """`smoothing`: label smoothing of the cross-entropy terms (GPT-2 E2E/WebNLG, Table 11: 0.1) —
    (1 - ε)·NLL + ε·mean over the vocabulary of -log p, as the authors' GPT-2 code; training only."""
    logits = logits.float()
    if objective == "causal_lm":
        shift = logits[:, :-1].reshape(-1, logits.size(-1))
        return F.cross_entropy(shift, labels[:, 1:].reshape(-1), ignore_index=IGNORE, reduction="sum",
                               label_smoothing=smoothing)
    if logits.size(-1) == 1:  # regression (STS-B)
        return F.mse_loss(logits.squeeze(-1), labels.float(), reduction="sum")
    return F.cross_entropy(logits, labels, reduction="sum", label_smoothing=smoothing)


def correct(logits: torch.Tensor, labels: torch.Tensor, objective: str) -> tuple[float, int]:
    """(correct predictions, predictions): classification accuracy, or next-token accuracy for LMs."""
    if objective == "causal_lm":
        pred, gold = logits[:, :-1].argmax(-1), labels[:, 1:]
        keep = gold != IGNORE
        return float((pred[keep] == gold[keep]).sum()), int(keep.sum())
    if logits.size(-1) == 1:
        return 0.0, 0
    return float((logits.argmax(-1) == labels).sum()), int(labels.numel())
