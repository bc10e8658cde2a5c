"""Tasks as data: each task turns a config into tokenized train/eval examples.

An example is a dict with `input_ids` (list[int]) and either `label` (seq_cls) or `loss_from` (causal_lm:
the index of the first token that is a target; earlier tokens are the prompt) or `loss_mask` (causal_lm: 1 per
target token, for multi-turn chats). A packed row (task sft, data.packing) adds `position_ids` restarting at
0 for each example it holds. Splits are lists or `datasets.Dataset`s: the loop only indexes them.
"""
from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from .synthetic import synthetic_cls, synthetic_lm
from .tasks import TASK_BUILDERS
from .user import USER_TASKS


@dataclass
class TaskData:
    train: Sequence[dict]  # a list, or a datasets.Dataset (user data, tokenized once)
    eval: Sequence[dict]
    objective: str  # causal_lm | seq_cls
    num_labels: int = 0  # seq_cls: classes (1 = regression)
    label_names: list[str] | None = None  # task cls: class names in id order, saved as run_dir/labels.json
    summary: str = ""  # one line for the start of a run: examples, tokens, truncation, loss-bearing share


# name -> builder(cfg, vocab_size, tokenizer) -> TaskData
TASKS: dict[str, Callable] = {
    "synthetic_cls": synthetic_cls,
    "synthetic_lm": synthetic_lm,
    **TASK_BUILDERS,  # glue/<task>, e2e and the hub NLG tasks (bigadapt/data/tasks.py)
    **USER_TASKS,  # sft, text, cls on the user's own files (bigadapt/data/user.py)
}


def build_task(cfg, vocab_size: int, tokenizer=None) -> TaskData:
    return TASKS[cfg.data.task](cfg, vocab_size, tokenizer)


def shared_data_dir() -> Path:
    """The offline datasets: $BIGADAPT_SHARED_DATA, else ../shared/data beside the repository."""
    env = os.environ.get("BIGADAPT_SHARED_DATA")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[2].parent / "shared" / "data"
