"""Experiment trackers (TensorBoard, Weights & Biases): copies of what `Loop._log` writes to metrics.jsonl.

metrics.jsonl stays the source of truth; a tracker only mirrors its records, on rank 0, with their step.
A resumed run continues the same step axis: TensorBoard hides the events an interrupted run wrote after its
last checkpoint (`purge_step`), as `_trim_metrics` drops them from metrics.jsonl, and W&B continues the same
run (its id is kept in the run directory).
"""
from __future__ import annotations

import importlib.util
import uuid
from pathlib import Path

from .errors import ConfigError

TRACKERS = ("tensorboard", "wandb")


def check(track: list[str]) -> None:
    """Config-time check (no files, no imports of the trackers themselves)."""
    for name in track:
        if name not in TRACKERS:
            raise ConfigError(f"train.track={track!r}: unknown tracker {name!r}; use any of {', '.join(TRACKERS)}")
    if "wandb" in track and importlib.util.find_spec("wandb") is None:
        raise ConfigError("train.track: wandb is not installed; pip install 'bigadapt[wandb]' or drop wandb")


def scalars(record: dict) -> tuple[int, dict[str, float]]:
    """(step, {tag: value}) of one metrics record: train records under train/, evals under eval/; strings
    (the split) and the step itself are not curves."""
    group = record.get("split", "train")
    values = {f"{group}/{k}": float(v) for k, v in record.items()
              if k not in ("step", "split") and isinstance(v, (int, float)) and not isinstance(v, bool)}
    return int(record["step"]), values


class Trackers:
    """The trackers a run asked for; on ranks other than 0 (or with none asked for) every call does nothing."""

    def __init__(self, track: list[str], run_dir: Path, start: int, config: dict, rank: int = 0):
        self.writers: list = []
        if rank != 0:
            return
        if "tensorboard" in track:
            self.writers.append(_TensorBoard(run_dir, start))
        if "wandb" in track:
            self.writers.append(_WandB(run_dir, config, resumed=start > 0))

    def log(self, record: dict) -> None:
        if self.writers:
            step, values = scalars(record)
            for w in self.writers:
                w.log(step, values)

    def close(self) -> None:
        """Flush and close; safe to call twice (the end of a run and its `finally`)."""
        writers, self.writers = self.writers, []
        for w in writers:
            w.close()


class _TensorBoard:
    def __init__(self, run_dir: Path, start: int):
        from torch.utils.tensorboard import SummaryWriter
        # records after the checkpoint step are redone by this run: hide the interrupted run's copies
        # (a fresh run in a reused directory starts at 0 and hides all of a previous run's curves)
        self.writer = SummaryWriter(log_dir=str(run_dir / "tensorboard"), purge_step=start + 1)

    def log(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        self.writer.close()


class _WandB:
    def __init__(self, run_dir: Path, config: dict, resumed: bool):
        import wandb
        # one W&B run per run of the directory: a resume appends to it, a fresh start (--overwrite) begins a new
        # one. W&B drops steps at or below the last one it has, so records redone after a resume keep the
        # interrupted run's values (bitwise equal on CPU)
        id_file = run_dir / "wandb_id.txt"
        if not resumed or not id_file.exists():
            id_file.write_text(uuid.uuid4().hex[:12])
        self.run = wandb.init(project=config.get("train", {}).get("wandb_project") or "bigadapt",
                              name=run_dir.resolve().name, id=id_file.read_text().strip(), resume="allow",
                              dir=str(run_dir), config=config)

    def log(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()
