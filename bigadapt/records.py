"""metrics.jsonl, the run's log of step and eval records: one JSON object per line, appended by rank 0.

A log, not state: a line torn by a crash or a full disk during an append is dropped with a warning by every
reader (training's resume, `bigadapt status`, the benches, the tests), never a reason to refuse a run whose
checkpoints are intact.
"""
from __future__ import annotations

import json
from pathlib import Path

from .errors import StorageError


def read(path: Path, warn=None) -> list[dict]:
    """Every whole record of `path`, in order; [] when it does not exist. Unreadable lines are skipped, each
    named in one warning (by default through bigadapt's logger)."""
    return [record for _, record in _parse(path, warn)]


def trim(path: Path, last_step: int, warn=None) -> None:
    """Keep the records up to `last_step` (a resume redoes the steps after its checkpoint), lines unchanged; torn
    lines go."""
    if path.is_file():
        rewrite(path, [line for line, record in _parse(path, warn) if record.get("step", 0) <= last_step])


def _parse(path: Path, warn) -> list[tuple[str, dict]]:
    if not path.is_file():
        return []
    out, torn = [], []
    for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            record = None
        if isinstance(record, dict):
            out.append((line, record))
        else:
            torn.append(number)
    if torn:
        if warn is None:
            from .display import log as warn
        warn(f"warning: {path}: dropped {len(torn)} unreadable line(s) (line {', '.join(map(str, torn[:5]))}), "
             f"e.g. torn by a crash or a full disk during an append")
    return out


def append(path: Path, record: dict) -> None:
    """One record, as one write of one line, so a failure tears at most this line."""
    try:
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        raise StorageError(f"{path}: cannot be appended to ({e.strerror}); free space or fix permissions, then "
                           f"continue with --resume auto") from None


def rewrite(path: Path, lines: list[str]) -> None:
    """Replace the file with `lines` through a temporary file: a crash leaves the old or the new one whole."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text("".join(line + "\n" for line in lines))
        tmp.replace(path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise StorageError(f"{path}: cannot be rewritten ({e.strerror}); free space or fix permissions") from None
