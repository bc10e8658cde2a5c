"""GLUE tasks read from the TSV files that GLUE's download_glue_data.py writes.

The files are tab-separated with no quoting (quote characters appear literally in the text), and
MRPC starts with a UTF-8 BOM; CoLA train/dev have no header. A record is
`{"text_a": str, "text_b": str | None, "label": int | float | None}`: `label` is the class index
(a float score for STS-B) and None for unlabeled test files. Text is kept verbatim (SST-2 sentences
end with a space, as GLUE ships them).
"""
from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypedDict

from bigadapt.errors import ConfigError, DataError

from . import shared_data_dir


class GlueRecord(TypedDict):
    text_a: str
    text_b: str | None
    label: int | float | None


_SPLITS = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}


@dataclass(frozen=True)
class GlueTask:
    """Where a task's columns are and how the paper scores it (num_labels 1 = regression)."""

    folder: str
    num_labels: int
    label_names: tuple[str, ...]
    metrics: tuple[str, ...]
    text_a: str
    text_b: str | None
    label: str
    splits: dict[str, str] = field(default_factory=lambda: dict(_SPLITS))
    # Column names for files that ship without a header (CoLA train/dev).
    headerless: dict[str, tuple[str, ...]] = field(default_factory=dict)
    score_range: tuple[float, float] | None = None


_COLA_COLUMNS = ("source", "label", "original_label", "sentence")
_NLI_SPLITS = {
    "train": "train.tsv",
    "dev_matched": "dev_matched.tsv",
    "dev_mismatched": "dev_mismatched.tsv",
    "test_matched": "test_matched.tsv",
    "test_mismatched": "test_mismatched.tsv",
}

# Label orders follow the HF `glue` dataset, which microsoft/LoRA's run_glue.py reads.
GLUE_TASKS: dict[str, GlueTask] = {
    "mnli": GlueTask("MNLI", 3, ("entailment", "neutral", "contradiction"), ("accuracy",),
                     "sentence1", "sentence2", "gold_label", splits=_NLI_SPLITS),
    "sst2": GlueTask("SST-2", 2, ("negative", "positive"), ("accuracy",), "sentence", None, "label"),
    "mrpc": GlueTask("MRPC", 2, ("not_equivalent", "equivalent"), ("accuracy", "f1"),
                     "#1 String", "#2 String", "Quality"),
    "cola": GlueTask("CoLA", 2, ("unacceptable", "acceptable"), ("mcc",), "sentence", None, "label",
                     headerless={"train": _COLA_COLUMNS, "dev": _COLA_COLUMNS}),
    "qnli": GlueTask("QNLI", 2, ("entailment", "not_entailment"), ("accuracy",),
                     "question", "sentence", "label"),
    "qqp": GlueTask("QQP", 2, ("not_duplicate", "duplicate"), ("accuracy", "f1"),
                    "question1", "question2", "is_duplicate"),
    "rte": GlueTask("RTE", 2, ("entailment", "not_entailment"), ("accuracy",),
                    "sentence1", "sentence2", "label"),
    "stsb": GlueTask("STS-B", 1, (), ("pearson", "spearman"), "sentence1", "sentence2", "score",
                     score_range=(0.0, 5.0)),
}


def glue_task(name: str) -> GlueTask:
    """Look a task up by any spelling of its name ("SST-2", "sst2", "STS_B", ...)."""
    key = name.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ConfigError(f"unknown GLUE task {name!r}; known tasks: {', '.join(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def load_glue(task: str, split: str, data_dir: str | Path | None = None) -> list[GlueRecord]:
    """Records of one split of a GLUE task from `<data_dir>/<folder>/<split>.tsv`.

    `data_dir` defaults to `shared_data_dir()/glue`. Splits are "train", "dev", "test" (MNLI:
    "train", "dev_matched", "dev_mismatched", "test_matched", "test_mismatched").
    """
    spec = glue_task(task)
    if split not in spec.splits:
        raise ConfigError(f"GLUE task {task!r} has no split {split!r}; splits: {', '.join(spec.splits)}")
    root = Path(data_dir) if data_dir is not None else shared_data_dir() / "glue"
    path = root / spec.folder / spec.splits[split]
    if not path.is_file():
        raise DataError(f"{path}: GLUE file not found (data_dir={root})")
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = spec.headerless.get(split) or next(rows, None)
        if header is None:
            raise DataError(f"{path}:1: empty file, expected a header")
        columns = _column_indices(spec, header, path, labeled=not split.startswith("test"))
        return [_record(spec, row, columns, len(header), path, rows.line_num) for row in rows]


def _column_indices(spec: GlueTask, header, path: Path, labeled: bool) -> tuple[int, int | None, int | None]:
    def index(name: str) -> int:
        if name not in header:
            raise DataError(f"{path}:1: missing column {name!r} (header: {' | '.join(header)})")
        return list(header).index(name)

    text_b = index(spec.text_b) if spec.text_b else None
    label = index(spec.label) if labeled else None
    return index(spec.text_a), text_b, label


def _record(spec: GlueTask, row: list[str], columns, width: int, path: Path, line: int) -> GlueRecord:
    if len(row) != width:
        raise DataError(f"{path}:{line}: expected {width} tab-separated columns, found {len(row)}")
    a, b, label = columns
    return {
        "text_a": row[a],
        "text_b": row[b] if b is not None else None,
        "label": _label(spec, row[label], path, line) if label is not None else None,
    }


def _label(spec: GlueTask, raw: str, path: Path, line: int) -> int | float:
    if spec.score_range is not None:
        low, high = spec.score_range
        try:
            score = float(raw)
        except ValueError:
            raise DataError(f"{path}:{line}: score {raw!r} is not a number") from None
        if not low <= score <= high:
            raise DataError(f"{path}:{line}: score {score} is outside [{low}, {high}]")
        return score
    if raw in spec.label_names:
        return spec.label_names.index(raw)
    try:
        label = int(raw)
    except ValueError:
        raise DataError(f"{path}:{line}: label {raw!r} is neither 0..{spec.num_labels - 1} "
                        f"nor one of {', '.join(spec.label_names)}") from None
    if not 0 <= label < spec.num_labels:
        raise DataError(f"{path}:{line}: label {label} is out of range 0..{spec.num_labels - 1}")
    return label
