"""Tasks as data: each task turns a config into tokenized train/eval examples.

An example is a dict with `input_ids` (list[int]) and either `label` (seq_cls) or `loss_from` (causal_lm:
the index of the first token that is a target; earlier tokens are the prompt).
"""
from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .synthetic import synthetic_cls, synthetic_lm
from .tasks import TASK_BUILDERS


@dataclass
class TaskData:
    train: list[dict]
    eval: list[dict]
    objective: str  # causal_lm | seq_cls
    num_labels: int = 0  # seq_cls: classes (1 = regression)


# name -> builder(cfg, vocab_size, tokenizer) -> TaskData
TASKS: dict[str, Callable] = {
    "synthetic_cls": synthetic_cls,
    "synthetic_lm": synthetic_lm,
    **TASK_BUILDERS,  # glue/<task>, e2e and the hub NLG tasks (bigadapt/data/tasks.py)
}


def build_task(cfg, vocab_size: int, tokenizer=None) -> TaskData:
    return TASKS[cfg.data.task](cfg, vocab_size, tokenizer)


def shared_data_dir() -> Path:
    """The offline datasets: $BIGADAPT_SHARED_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("BIGADAPT_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"
