"""What rank 0 shows: the start table, a live progress line, the end summary. Other ranks stay quiet."""
from __future__ import annotations

import contextlib
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator

import torch
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from . import zero

# logs are read as files: do not wrap lines at 80 columns there
console = Console(highlight=False, width=None if sys.stdout.isatty() else 200)


def log(msg: str) -> None:
    if zero.rank() == 0:
        console.print(msg)


def memory_mb() -> float:
    """Peak allocated GPU memory, or peak RSS of this process on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def resident_mb() -> float:
    """Memory held now, the counterpart of `memory_mb`: allocated GPU memory, or this process's RSS on CPU."""
    if torch.cuda.is_available():
        return torch.cuda.memory_allocated() / 2**20
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def start_table(holdings: dict, trainable: list[tuple[str, str, int]], stage: int, accumulation: int) -> None:
    if zero.rank() != 0:
        return
    n_train = holdings["trainable_numel_total"]
    total = holdings["base_numel_total"] + n_train  # "% of all parameters", defined for full fine-tuning too
    t = Table(title=f"bigadapt: ZeRO stage {stage}, {holdings['world_size']} rank(s), "
                    f"gradient accumulation {accumulation}")
    t.add_column("trainable")
    t.add_column("params", justify="right")
    t.add_column("% of all", justify="right")
    t.add_column("dtype (working / master)")
    for kind, dtype, n in trainable:
        t.add_row(kind, f"{n:,}", f"{100 * n / max(total, 1):.4f}", dtype)
    t.add_row("total", f"{n_train:,}", f"{100 * n_train / max(total, 1):.4f}", "")
    console.print(t)
    r = Table(title=f"what each rank holds (frozen base: {holdings['base_numel_total']:,} params)")
    for col in ("rank", "base params", "base MiB", "trainable params", "optimizer state MiB"):
        r.add_column(col, justify="right")
    for h in holdings["ranks"]:
        r.add_row(str(h["rank"]), f"{h['base_numel']:,}", f"{h['base_bytes'] / 2**20:.2f}",
                  f"{h['trainable_numel']:,}", f"{h['optimizer_state_bytes'] / 2**20:.3f}")
    console.print(r)


EVAL_BAR_MIN_BATCHES = 20  # shorter evals finish before a bar would tell anything


class Eta:
    """Time left at the pace of the steps run *in this process*: a resumed run's earlier steps took no time
    here, so counting them would make the rate look too fast. The pace is wall-clock, evals and saves
    included, since they recur in the steps left too."""

    def __init__(self, start: int, total: int, clock: Callable[[], float] = time.monotonic):
        self.start, self.total, self.clock, self.t0 = start, total, clock, clock()

    def seconds(self, done: int) -> float | None:
        ran = done - self.start
        return (self.clock() - self.t0) / ran * (self.total - done) if ran > 0 else None

    def text(self, done: int) -> str:
        s = self.seconds(done)
        return "-:--:--" if s is None else duration(s)


def duration(seconds: float) -> str:
    """H:MM:SS (days spill into the hours), as rich's time columns write it."""
    m, s = divmod(int(round(seconds)), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}"


def _progress_bar(transient: bool = False) -> Progress:
    return Progress(TextColumn("{task.description} {task.completed}/{task.total}"), BarColumn(), TimeElapsedColumn(),
                    TextColumn("eta {task.fields[eta]}"), TextColumn("{task.fields[info]}"), console=console,
                    transient=transient,
                    disable=not console.is_terminal and not os.environ.get("BIGADAPT_FORCE_PROGRESS"))


_train_bar: Progress | None = None  # the live training bar, which an eval bar joins (rich allows one live display)


def progress(total_steps: int, start: int) -> Progress | None:
    """The training bar (task 0): update it with completed=, info= and eta= (`Eta.text`)."""
    global _train_bar
    if zero.rank() != 0:
        return None
    _train_bar = _progress_bar()
    _train_bar.add_task("step", total=total_steps, completed=start, info="", eta="-:--:--")
    return _train_bar


@contextlib.contextmanager
def eval_progress(batches: int) -> Iterator[Callable[[], None]]:
    """A transient bar over a long eval's batches on rank 0, joining the training bar when it is live;
    yields advance(). Short evals and other ranks get a no-op."""
    if zero.rank() != 0 or batches < EVAL_BAR_MIN_BATCHES:
        yield lambda: None
        return
    live = _train_bar is not None and _train_bar.live.is_started
    bar = _train_bar if live else _progress_bar(transient=True)
    eta = Eta(0, batches)
    task = bar.add_task("eval batch", total=batches, info="", eta=eta.text(0))
    done = 0

    def advance() -> None:
        nonlocal done
        done += 1
        bar.update(task, completed=done, eta=eta.text(done))

    if not live:
        bar.start()
    try:
        yield advance
    finally:
        bar.remove_task(task)
        if not live:
            bar.stop()


def accounting_table(rows: list[tuple[str, int, int, float]], predicted_total: int, peak: int) -> None:
    """Predicted vs measured model-state bytes of rank 0."""
    t = Table(title="memory: predicted before the run vs measured (rank 0)")
    for col in ("component", "predicted MiB", "measured MiB", "error"):
        t.add_column(col, justify="right")
    for key, pred, meas, err in rows:
        t.add_row(key, f"{pred / 2**20:.3f}", f"{meas / 2**20:.3f}", f"{100 * err:+.1f}%" if meas else "-")
    t.add_row("peak (all memory)", f"{predicted_total / 2**20:.1f}", f"{peak / 2**20:.1f}",
              f"{100 * (predicted_total - peak) / peak:+.1f}%")
    console.print(t)


def estimate_line(predicted: dict) -> None:
    """The memory predicted for this rank before anything is loaded (saved in estimate.json)."""
    m = {k: v / 2**20 for k, v in predicted.items()}
    log(f"predicted per rank: model states {m['model_states']:.1f} MiB (base partition {m['base_partition']:.1f}, "
        f"trainable {m['trainable_working']:.2f}, fp32 masters {m['fp32_masters']:.2f}, optimizer "
        f"{m['optimizer_states']:.2f}), activations {m['activations'] + m['logits']:.1f} MiB, "
        f"total {m['total']:.0f} MiB incl. {m['framework_overhead']:.0f} MiB framework overhead")
