"""The E2E NLG Challenge files that microsoft/LoRA's GPT-2 experiments use.

Each line is `MR||reference`, for example
`name : The Vaults | Type : pub | ...||The Vaults pub near Café Adriatic has a 5 star rating . `.
An MR appears once per reference. Like LoRA's format_converting_e2e.py, a line is stripped and
must split into exactly two fields on "||".
"""
from __future__ import annotations

from pathlib import Path
from typing import TypedDict

from bigadapt.errors import ConfigError, DataError

from . import shared_data_dir

E2E_SPLITS = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}


class E2ERecord(TypedDict):
    mr: str
    ref: str


def load_e2e(split: str, data_dir: str | Path | None = None) -> list[E2ERecord]:
    """One record per line of `<data_dir>/<split>.txt`; `data_dir` defaults to `shared_data_dir()/e2e`."""
    if split not in E2E_SPLITS:
        raise ConfigError(f"E2E has no split {split!r}; splits: {', '.join(E2E_SPLITS)}")
    root = Path(data_dir) if data_dir is not None else shared_data_dir() / "e2e"
    path = root / E2E_SPLITS[split]
    if not path.is_file():
        raise DataError(f"{path}: E2E file not found (data_dir={root})")
    with open(path, encoding="utf-8") as f:
        return [_record(line, path, number) for number, line in enumerate(f, start=1)]


def _record(line: str, path: Path, number: int) -> E2ERecord:
    fields = line.strip().split("||")
    if len(fields) != 2:
        raise DataError(f"{path}:{number}: expected 'MR||reference', found {len(fields) - 1} '||' separators")
    mr, ref = fields
    if not mr or not ref:
        raise DataError(f"{path}:{number}: empty {'MR' if not mr else 'reference'}")
    return {"mr": mr, "ref": ref}


def group_references(records: list[E2ERecord]) -> list[tuple[str, list[str]]]:
    """(MR, its references) in order of first appearance: E2E is scored against all references of an MR."""
    grouped: dict[str, list[str]] = {}
    for record in records:
        grouped.setdefault(record["mr"], []).append(record["ref"])
    return list(grouped.items())
