"""`zero.stage: auto`: the fastest ZeRO layout the accounting predicts to fit in the memory of one device.

For a frozen base with a few trainable tensors DeepSpeed offers two kinds of layout:
  replicated (stage 0, 1, 2): every rank holds the whole base; only the trainables' fp32 masters and Adam
      moments (1, 2) and gradients (2) are partitioned. A step gathers nothing.
  partitioned (stage 3): a rank holds 1/world of everything, and the base is re-gathered block by block in
      every forward and backward: the cost users meet as "ZeRO-3 with LoRA is slow" (LLaMA-Factory #3499:
      20 min for 20 steps under ZeRO-3, 17 s under ZeRO-2). Its gather windows take what memory is left.
Fastest first: one rank -> 0 (no collective at all; 2 in its place with optimizer offload, which 0 refuses),
then 3. Two or more ranks -> 2, then 1, then 3. Stage 2 before 0 there: DeepSpeed's stage-0 gradient
all-reduce moves the same bytes as stage 2's reduce-scatter + all-gather of the updated partitions, and 2
holds less. Stage 2 before 1: the same communication, and 1 keeps whole gradients (1 only fits where 2 does
unless the reduce bucket tips it; it is tried for completeness). Stage 3 last: every step gathers the base.
An explicit zero.stage is obeyed; `null` keeps the fixed rule (3 with two or more ranks, else 0).
"""
from __future__ import annotations

import dataclasses
import os
import re
from dataclasses import dataclass

import torch

from . import accounting
from .accounting import BYTES, GIB, Layout
from .errors import ConfigError

SIZE = re.compile(r"^\s*([\d.]+)\s*(GB|GIB|G|MB|MIB|M|TB|TIB|T)?\s*$", re.I)
# GPU makers' "80GB" is ~80 GiB of memory (an H100 80GB reports 79.6 GiB): GB is read as GiB here
UNITS = {"": GIB, "g": GIB, "gb": GIB, "gib": GIB, "m": 2**20, "mb": 2**20, "mib": 2**20,
         "t": 2**40, "tb": 2**40, "tib": 2**40}
ORDER = (2, 1, 3)  # two or more ranks, fastest first (module docstring)
WINDOW_KEYS = ("prefetch_bucket_size", "max_live_parameters", "max_reuse_distance")
# The gather windows are the one thing sized to fill what the budget leaves; filled to the byte, any error of the
# prediction (allocator slack, host libraries in RSS on CPU: +4% to +15% measured) would put the peak over the
# budget. They take the spare memory of (1 - WINDOW_HEADROOM) x budget.
WINDOW_HEADROOM = 0.10


def parse_size(text: str, flag: str = "--gpu-memory") -> int:
    m = SIZE.match(str(text))
    if not m:
        raise ConfigError(f"{flag}={text!r}: write a size such as 80GB, 80GiB or 141GB")
    return int(float(m.group(1)) * UNITS[(m.group(2) or "").lower()])


def configured_budget(z) -> int | None:
    """zero.memory_budget in bytes (an int, or a size string); ConfigError naming the key when unreadable."""
    if z.memory_budget is None:
        return None
    budget = z.memory_budget if isinstance(z.memory_budget, int) else parse_size(z.memory_budget,
                                                                                   "zero.memory_budget")
    if budget <= 0:
        raise ConfigError(f"zero.memory_budget={z.memory_budget!r}: must be a positive size, e.g. 80GiB")
    return budget


def memory_budget(cfg) -> tuple[int | None, str]:
    """(bytes per device, where from): zero.memory_budget, else this rank's GPU's total memory (the accounting
    counts the CUDA context itself, so not the free memory, which has it subtracted), else unknown."""
    budget = configured_budget(cfg.zero)
    if budget is not None:
        return budget, "zero.memory_budget"
    if torch.cuda.is_available():
        index = int(os.environ.get("LOCAL_RANK", "0")) % torch.cuda.device_count()
        props = torch.cuda.get_device_properties(index)
        return props.total_memory, f"the GPU's memory ({props.name})"
    return None, "no GPU and zero.memory_budget unset"


@dataclass
class Choice:
    requested: object  # zero.stage as written
    stage: int
    reason: str  # the start line
    budget: int | None
    budget_from: str
    predicted: dict  # {stage: per-rank total bytes} of every layout weighed
    windows: dict | None = None  # ZeRO-3 gather windows (elements), when sized here

    def record(self) -> dict:
        return {k: ({str(s): b for s, b in v.items()} if k == "predicted" else v)
                for k, v in dataclasses.asdict(self).items()}


def _gib(b: int) -> str:
    return f"{b / GIB:,.1f} GiB"


def _candidates(cfg, world: int) -> list[int]:
    """The layouts the run's offload settings allow, fastest first."""
    z = cfg.zero
    if z.offload_param != "none" or z.offload_optimizer == "nvme":
        return [3]
    if world == 1:  # stage 0 refuses optimizer offload: stage 2 keeps the base whole on one rank with it
        return [0, 3] if z.offload_optimizer == "none" else [2, 3]
    return list(ORDER)


def with_zero(cfg, **values):
    """A copy of the run config with these zero.* values (the user's config object stays as written)."""
    return dataclasses.replace(cfg, zero=dataclasses.replace(cfg.zero, **values))


def _total(shape, cfg, lay: Layout, stage: int) -> int:
    return accounting.per_rank(shape, cfg, dataclasses.replace(lay, stage=stage))["total"]


def stage3_windows(shape, cfg, lay: Layout, budget: int | None) -> tuple[dict | None, int]:
    """(gather windows sized to the memory the budget leaves over one-block windows, or None when no budget is
    known or not even those fit; the per-rank total with them). Explicit zero.* windows are kept as set."""
    least = _total(shape, cfg, lay, 3)
    if budget is None or least > budget:
        return None, least
    spare = max(0, int(budget * (1 - WINDOW_HEADROOM)) - least) // BYTES[cfg.model.dtype]
    windows = accounting.gather_windows(shape, cfg.zero, spare)
    return windows, _total(shape, with_zero(cfg, **windows), lay, 3)


def choose(cfg, lay: Layout, shape=None, budget: int | None = None, budget_from: str = "") -> Choice:
    """The layout for `lay`'s world size and batch shape (its stage is ignored). `budget`: bytes per device,
    default memory_budget(cfg). Raises ConfigError when zero.stage is auto, a budget is known and nothing fits."""
    if budget is None:
        budget, budget_from = memory_budget(cfg)
    shape = shape if shape is not None else accounting.shapes(cfg)[0]
    requested, world = cfg.zero.stage, lay.world
    if isinstance(requested, int):
        return _obeyed(shape, cfg, lay, requested, budget, budget_from, f"zero.stage {requested} as set")
    if requested is None or budget is None:
        stage = 3 if world >= 2 else 0
        why = ("zero.stage null" if requested is None
               else f"zero.stage auto, no memory budget known ({budget_from})")
        return _obeyed(shape, cfg, lay, stage, budget, budget_from,
                       f"{why} -> {stage}: the fixed rule, 3 with two or more ranks, else 0")
    predicted = {}
    for stage in _candidates(cfg, world):
        windows, predicted[stage] = (stage3_windows(shape, cfg, lay, budget) if stage == 3
                                     else (None, _total(shape, cfg, lay, stage)))
        if predicted[stage] <= budget:
            return Choice(requested, stage, _why(stage, predicted, budget, budget_from, world, windows), budget,
                          budget_from, predicted, windows)
    raise ConfigError(_nothing_fits(shape, cfg, lay, predicted, budget, budget_from))


def _obeyed(shape, cfg, lay: Layout, stage: int, budget, budget_from: str, head: str) -> Choice:
    """A stage set (or given by the fixed rule): predicted, and under ZeRO-3 its windows sized from a known budget."""
    windows, total = stage3_windows(shape, cfg, lay, budget) if stage == 3 else (None, _total(shape, cfg, lay, stage))
    note = f"predicted {_gib(total)} per rank"
    if budget is not None:
        note += f" of {_gib(budget)} ({budget_from})"
        note += "" if total <= budget else ", over it: expect out-of-memory (see `bigadapt estimate`)"
    if windows:
        note += f"; gather windows sized to the memory left (max_live_parameters {windows['max_live_parameters']:,})"
    return Choice(cfg.zero.stage, stage, f"{head}: {note}", budget, budget_from, {stage: total}, windows)


def _why(stage: int, predicted: dict, budget: int, budget_from: str, world: int, windows) -> str:
    head = f"zero.stage auto -> {stage}: "
    fits = f"fits in {_gib(budget)} ({budget_from})"
    if stage == 0:
        return head + f"one rank, the whole model and its states ({_gib(predicted[0])}) {fits}"
    over = "; ".join(f"stage {s} needs {_gib(b)}" for s, b in predicted.items() if s != stage)
    if stage in (1, 2):
        return (head + f"the replicated base + states ({_gib(predicted[stage])} per rank) {fits}"
                + (f" ({over})" if over else "") + "; stage 3 would add gathers")
    live = f"; gather windows sized to the memory left: max_live_parameters {windows['max_live_parameters']:,}"
    return (head + f"the base replicated does not fit ({over}, over {_gib(budget)}); partitioned over {world} "
            f"rank(s) {_gib(predicted[3])} per rank {fits}" + live)


def _nothing_fits(shape, cfg, lay: Layout, predicted: dict, budget: int, budget_from: str) -> str:
    need = ", ".join(f"stage {s} {_gib(b)}" for s, b in predicted.items())
    few = accounting.fewest_ranks(shape, cfg, dataclasses.replace(lay, stage=3), budget) if 3 in predicted else None
    more = f"at least {few} ranks, " if few else ""  # none: what is left is activations, which ranks do not split
    where = "" if budget_from == "zero.memory_budget" else f" (from {budget_from}; zero.memory_budget overrides it)"
    return (f"zero.memory_budget={_gib(budget)}{where}: with zero.stage auto no ZeRO layout fits on {lay.world} "
            f"rank(s) (per rank: {need}); use {more}zero.offload_optimizer/offload_param=cpu, "
            f"train.activation_checkpointing=true or a smaller train.micro_batch (see `bigadapt estimate --fit`)")


def run_layout(cfg, world: int) -> Layout:
    """The run's own layout levers (its batch shape, checkpointing, this machine); the stage is decided here."""
    return Layout(world, 3, cfg.train.micro_batch, cfg.data.seq_len, cfg.train.activation_checkpointing,
                  device="gpu" if torch.cuda.is_available() else "cpu", checkpoint_every=cfg.train.checkpoint_every)


def resolve(cfg, lay: Layout, shape=None) -> tuple[object, Choice]:
    """(the config the run uses: zero.stage an int, ZeRO-3 windows as chosen; the choice). The user's config
    keeps `auto`, so a run resumed on another world size chooses again."""
    choice = choose(cfg, lay, shape)
    return with_zero(cfg, stage=choice.stage, **(choice.windows or {})), choice
