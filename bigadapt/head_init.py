"""Where a fresh task head starts: a regression head's output bias at the training labels' mean.

A fresh regression head (num_labels == 1) from transformers starts with bias 0. On STS-B, whose labels average 2.70,
the model must then move its output by ~2.7 through a frozen, barely trained pooler; Adam moves the bias itself only
~lr per step, so LoRA (and AdapterH) learned near-rank-1 updates that collapsed the [CLS] representations (MiniLM:
LoRA STS-B Pearson 0.134 against BitFit's 0.825). Started at the label mean, the same LoRA run reached 0.81-0.83 in
150 steps. So every method's regression head starts where a fitted constant model would: bias = mean(train labels).
Targets are not standardised; predictions stay in label units.

Classification heads keep transformers' init (bias 0): starting them at the class log-priors was not measured to
help, so it is not done.
"""
from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from . import zero
from .targets import HEAD_NAMES


def regression_output(model: nn.Module) -> nn.Linear | None:
    """The Linear that produces a regression head's single output (BERT `classifier`, RoBERTa `classifier.out_proj`,
    GPT-2/LLaMA `score`), or None when the model has no single-output head."""
    if getattr(model.config, "num_labels", None) != 1:
        return None
    for name in HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            linears = [m for m in head.modules() if isinstance(m, nn.Linear)]
            if linears and linears[-1].out_features == 1:
                return linears[-1]
    return None


def init_regression_bias(model: nn.Module, labels: Iterable[float]) -> float | None:
    """*Collective under ZeRO-3.* Set a fresh regression head's output bias to the mean of `labels` (the training
    labels); returns that mean, or None when there is nothing to set (not a regression model, or a head without a
    bias such as GPT-2's `score`). Works before or after `deepspeed.initialize`: after, the fp32 master is set too.
    Call it for a fresh head only — a resumed run restores the trained one."""
    out = regression_output(model)
    if out is None or out.bias is None:
        return None
    values = [float(v) for v in labels]
    if not values:
        return None
    mean = sum(values) / len(values)
    zero.set_master(out.bias, torch.full((1,), mean))
    return mean


def training_labels(rows) -> list[float]:
    """The "label" of every training example (a list of dicts or a datasets.Dataset)."""
    if hasattr(rows, "column_names"):
        return [float(v) for v in rows["label"]] if "label" in rows.column_names else []
    return [float(r["label"]) for r in rows if "label" in r]
