"""Memory and storage accounting: a pure function of (model shape, method, parallel layout, batch shape).

The model is built on the meta device (no weights: GPT-3 175B takes about a second), the method injected,
and every tensor counted exactly. Per-rank bytes follow what DeepSpeed allocates, buffer by buffer
(see `measure_model_states` in bigadapt/zero for the measured twin; the two are compared in every run):

ZeRO-3, W ranks, part(n) = ceil(n / W), F frozen and T trainable tensors:
  base_partition      sum_F part(n) * base bytes
  persistent_copies   tensors with n <= stage3_param_persistence_threshold stay whole after first use: n * bytes
  trainable_working   sum_T part(n) * working bytes (the base dtype under DeepSpeed mixed precision, else fp32)
  fp32_masters        sum_T part(n) * 4 (a copy even when the working copy is fp32, as measured on CPU)
  gradients           the grad-partition buffer, sum_T part(n) * working bytes
  optimizer_step      transient, not a model state: the fp32 grad of the largest optimizer sub-group
                      (largest sub-group's partitions * 4), alive only inside the optimizer step
  optimizer_states    AdamW: 2 * sum_T part(n) * 4
  reduce_bucket       reduce_bucket_size * working bytes (bigadapt caps it at the trainable count)
Offload (zero.offload_*; the rows above stay the bytes wherever they live): optimizer offload keeps masters,
moments and gradient partitions in host RAM, plus every sub-group's fp32 gradient (no transient step buffer);
param offload the partitions. offload_host_ram / offload_nvme / offload_swap_buffers say where; `total` is what
the accelerator holds. DeepSpeed settings are read from the merged config (the user's JSON included).
Stages 1/2: base and working copies whole; masters, moments (and at 2 gradients) partitioned. Stage 0: everything
whole; moments for trainable tensors only; their gradients exist only between
backward and step (transient) unless mixed precision keeps fp32 accumulation buffers.
On CPU ranks under ZeRO-3 gloo receives every all-gather into a second buffer of the gathered size
(zero3_gather_staging: the largest call, prefetch bucket + the largest tensor).
Activations count what autograd saves per block, by activation function and MLP shape (bigadapt/activations.py:
Korthikanti et al. 2022's terms, measured per architecture), and framework overhead is an explicit constant.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from torch import nn

from . import activations as saved
from . import methods, quantized, targets
from .errors import ConfigError
from .model import build_meta

GIB = 2**30
BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# CUDA context, cuBLAS/NCCL workspaces and allocator slack per GPU; the torch+DeepSpeed process on CPU
FRAMEWORK_OVERHEAD = {"gpu": int(2.0 * GIB), "cpu": int(0.45 * GIB)}
DS_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size (elements)
DS_SUB_GROUP = 1_000_000_000  # DeepSpeed's default sub_group_size (elements)


@dataclass
class Layout:
    world: int = 1
    stage: int = 3
    micro_batch: int = 1
    seq_len: int = 2048
    activation_checkpointing: bool = False
    device: str = "gpu"
    checkpoint_every: int = 1  # with activation_checkpointing: every k-th block (train.checkpoint_every)


def reduce_bucket_elements(trainable: int) -> int:
    """DeepSpeed allocates its gradient-reduction bucket up front; a LoRA never fills 5e8 elements."""
    return max(1, min(DS_REDUCE_BUCKET, trainable))


@dataclass
class Shape:
    """What the accounting needs of a model: its tensors and sizes, no weights."""
    tensors: list[tuple[str, int, bool, int]]  # (name, numel, trainable, ndim)
    config: object  # the transformers config (dimensions for activations)
    largest_block: int  # elements of the largest transformer block
    total: int  # elements of the whole model


def shapes(cfg) -> tuple[Shape, Shape]:
    """(the run's method, full fine-tuning) from one meta-device build; raises ConfigError for bad targets."""
    model = build_meta(cfg.model)
    largest = _largest_block(model)
    base = [(n, p.numel(), True, p.dim()) for n, p in model.named_parameters()]
    full = Shape(base, model.config, largest, sum(n for _, n, _, _ in base))
    methods.apply(model, cfg)
    ts = [(n, p.numel(), p.requires_grad, p.dim()) for n, p in model.named_parameters()]
    return Shape(ts, model.config, largest, sum(n for _, n, _, _ in ts)), full


def _largest_block(model) -> int:
    """Elements of the largest transformer block. LoRA by module names runs on models whose blocks bigadapt
    cannot tell: there the largest member of any ModuleList (blocks are the usual ones), else the whole model,
    so the gather working set is overestimated rather than missed."""
    found = targets.find_blocks(model)
    lists = [found[1]] if found else [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    sizes = [sum(p.numel() for p in blk.parameters()) for lst in lists for blk in lst]
    return max(sizes) if sizes else sum(p.numel() for p in model.parameters())


def zero_settings(cfg, lay: Layout, shape: Shape | None = None) -> dict:
    """The merged `zero_optimization` section the run gives DeepSpeed (the user's JSON included): what the
    accounting reads for thresholds, bucket sizes and offload."""
    from .engine import zero_section
    return zero_section(cfg, lay.stage, shape)


def model_states(ts: list[tuple[str, int, bool, int]], cfg, lay: Layout, z: dict | None = None) -> tuple[dict, int]:
    """Per-rank bytes of parameters, gradients and optimizer state at rest, wherever they live (see the module
    docstring; `offload` says how much of it is in host RAM or on NVMe), and the transient bytes of the
    optimizer step. `z`: the merged zero_optimization section (zero_settings)."""
    z = zero_settings(cfg, lay) if z is None else z
    base_b = BYTES[cfg.model.dtype]
    work_b = base_b  # DeepSpeed mixed precision casts trainable tensors to the base dtype; fp32 stays fp32
    frozen = [n for _, n, t, _ in ts if not t]
    train = [n for _, n, t, _ in ts if t]
    if cfg.model.quantization != "none":
        base_bytes = quantized.base_bytes(ts, cfg, lay.world if lay.stage == 3 else 1, BYTES[cfg.model.dtype])
    else:
        base_bytes = sum(frozen) * base_b if lay.stage < 3 else sum(math.ceil(n / lay.world) for n in frozen) * base_b
    if lay.stage == 0:
        mixed = work_b != 4
        return _total({
            "base_partition": base_bytes, "persistent_copies": 0,
            "trainable_working": sum(train) * work_b,
            "fp32_masters": sum(train) * 4 if mixed else 0,
            "gradients": sum(train) * 4 if mixed else 0,
            "optimizer_states": 2 * 4 * sum(train), "reduce_bucket": 0}), 0 if mixed else sum(train) * work_b
    part = [math.ceil(n / lay.world) for n in train]
    thr = _number(z.get("stage3_param_persistence_threshold"), 0)
    bucket = _number(z.get("reduce_bucket_size"), reduce_bucket_elements(sum(train)))
    step = _largest_sub_group(ts, lay.world, _number(z.get("sub_group_size"), DS_SUB_GROUP)) * 4
    # optimizer offload keeps each sub-group's fp32 gradient buffer in host RAM between steps (DeepSpeed
    # stage3.py: grads of the offloaded fp32 partitions are not freed): the optimizer step's transient stays
    offload_opt = _device(z, "offload_optimizer") != "none"
    return _total({
        "base_partition": base_bytes,
        "persistent_copies": sum(n * (work_b if t else base_b) for _, n, t, _ in ts if n <= thr),
        "trainable_working": (sum(train) if lay.stage < 3 else sum(part)) * work_b,  # stage 1/2: whole
        "fp32_masters": sum(part) * 4,
        "gradients": (sum(train) if lay.stage == 1 else sum(part)) * work_b + (sum(part) * 4 if offload_opt else 0),
        "optimizer_states": 2 * 4 * sum(part),
        "reduce_bucket": bucket * work_b,
    }), 0 if offload_opt else step


def _number(value, default):
    """A size from the merged DeepSpeed section ("auto" or absent: bigadapt's own)."""
    return int(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else default


def _device(z: dict, key: str) -> str:
    section = z.get(key)
    return section.get("device", "none") if isinstance(section, dict) else "none"


def offload(d: dict, z: dict, cfg) -> dict:
    """Where offloaded model states go, per rank: `offload_host_ram` and `offload_nvme` (disk) are bytes of the
    rows above that leave the accelerator; `offload_swap_buffers`, the pinned host buffers NVMe swapping adds.
    Optimizer offload moves the fp32 masters, Adam moments and gradient partitions (with nvme the gradients
    stay in host RAM); parameter offload the partitions of every parameter (base and trainable working copies).
    Persistent copies, gather buffers, the reduce bucket and activations stay on the accelerator."""
    host = nvme = buffers = 0
    opt_dev, par_dev = _device(z, "offload_optimizer"), _device(z, "offload_param")
    if opt_dev == "cpu":
        host += d["fp32_masters"] + d["optimizer_states"] + d["gradients"]
    elif opt_dev == "nvme":  # masters and moments swap per sub-group through buffer_count pinned buffers
        nvme += d["fp32_masters"] + d["optimizer_states"]
        host += d["gradients"]
        buffers += _buffers(z["offload_optimizer"], 4, 4 * _number(z.get("sub_group_size"), DS_SUB_GROUP))
    if par_dev == "cpu":
        host += d["base_partition"] + d["trainable_working"]
    elif par_dev == "nvme":
        nvme += d["base_partition"] + d["trainable_working"]
        buffers += _buffers(z["offload_param"], 5, _number(z["offload_param"].get("buffer_size"), 100_000_000)
                            * BYTES[cfg.model.dtype])
    return {"offload_host_ram": host, "offload_nvme": nvme, "offload_swap_buffers": buffers}


def _buffers(section: dict, count: int, size: int) -> int:
    """DeepSpeed's pinned NVMe swap buffers: buffer_count x a buffer (its defaults unless the JSON sets them)."""
    return _number(section.get("buffer_count"), count) * size


def _largest_sub_group(ts, world: int, sub_group: int = DS_SUB_GROUP) -> int:
    """Elements of DeepSpeed's fp32 grad buffer: the largest optimizer sub-group's partitions.

    Sub-groups split each AdamW group (engine.param_groups: matrices decay, biases and norms do not) once
    their partitions add up to sub_group_size.
    """
    largest = 0
    for decay in (True, False):
        part = 0
        for name, n, t, ndim in ts:
            if t and (ndim >= 2 and not name.endswith(".bias")) == decay:
                part += math.ceil(n / world)
                if part >= sub_group:
                    largest, part = max(largest, part), 0
        largest = max(largest, part)
    return largest


def _total(d: dict) -> dict:
    d["model_states"] = sum(d.values())
    return d


def activations(shape: Shape, cfg, lay: Layout) -> dict:
    """Activation bytes per rank for one micro-batch, by the block's saved tensors (bigadapt/activations.py)."""
    return saved.activations(shape, cfg, lay, attention(shape, cfg), _context(shape.config),
                             BYTES[cfg.model.dtype])


def attention(shape: Shape, cfg) -> str:
    """The attention implementation the run gets: model.attn_implementation, else what transformers chose for
    this model on the meta build (sdpa wherever torch has it)."""
    return cfg.model.attn_implementation or getattr(shape.config, "_attn_implementation", None) or "eager"


def _context(c) -> int:
    return getattr(c, "max_position_embeddings", None) or getattr(c, "n_positions", None) or 2048


def check_positions(shape: Shape, cfg) -> None:
    """Absolute-position models cannot take more tokens than they have positions (an index error later)."""
    need = cfg.data.seq_len + cfg.method.l_p + cfg.method.l_i
    have = _context(shape.config)
    if need > have:
        raise ConfigError(f"data.seq_len={cfg.data.seq_len}: with method.l_p + method.l_i = "
                          f"{cfg.method.l_p + cfg.method.l_i} virtual tokens a sequence needs {need} positions, "
                          f"the model has {have}; shorten data.seq_len or the prefix")


# DeepSpeed's own ZeRO-3 windows (elements): absolute, so for any model under ~1e9 elements they keep every
# layer gathered from its forward to its backward, i.e. the whole base on every rank
DS_WINDOWS = {"prefetch_bucket_size": 50_000_000, "max_live_parameters": 10**9, "max_reuse_distance": 10**9}


def gather_windows(shape: Shape, z, spare: int = 0) -> dict:
    """ZeRO-3's gather windows (elements), each from the config or sized from the model's unit of work (its
    largest block, or its largest tensor if an embedding is bigger): prefetch the next unit while computing
    this one, at most two units live, keep a unit gathered only for an immediate reuse (the last block's
    forward runs straight into its backward). `spare`: elements a memory budget leaves over (bigadapt/layout.py)
    widen the live window by that much, prefetch and reuse to all of it but one unit. Never wider than
    DeepSpeed's defaults, which decide for big models (below ~1e9 elements they keep the whole base)."""
    unit = max(shape.largest_block, _largest_tensor(shape))
    live = 2 * unit + max(0, spare)
    auto = {"prefetch_bucket_size": live - unit, "max_live_parameters": live, "max_reuse_distance": live - unit}
    return {k: (min(v, DS_WINDOWS[k]) if getattr(z, k) is None else getattr(z, k)) for k, v in auto.items()}


def _largest_tensor(shape: Shape) -> int:
    return max((n for _, n, _, _ in shape.tensors), default=0)


def gather_buffers(shape: Shape, cfg, lay: Layout) -> int:
    """ZeRO-3 working memory: what max_live_parameters lets prefetches and reuse keep gathered, plus the
    module being computed (fetched whether or not the window is full), capped by the model itself."""
    if lay.stage != 3:
        return 0
    live = min(gather_windows(shape, cfg.zero)["max_live_parameters"] + _largest_tensor(shape), shape.total)
    return live * BYTES[cfg.model.dtype]


def gather_staging(shape: Shape, cfg, lay: Layout) -> int:
    """CPU ranks (gloo) under ZeRO-3: bytes of the receive buffer of the largest single all-gather. Gloo does not
    gather in place: ProcessGroupGloo.cpp's AsyncAllgatherWork::allgather receives into `flatOutputTensor =
    newLikeFlat(outputs[0])`, the whole gathered size, then `copy_`s it into DeepSpeed's buffer, so while one
    all-gather lands its bytes exist twice (the rehearsal's missing 0.24 GiB per rank, docs/accounting.md). The
    largest call is a prefetch: DeepSpeed coalesces into one all_gather_coalesced every parameter it queues
    while `numel_prefetching < prefetch_bucket_size`, so up to the bucket plus the tensor that crosses it
    (partitioned_param_coordinator.py, fetch_sub_module). NCCL receives in place: 0 on GPUs."""
    if lay.stage != 3 or lay.device != "cpu":
        return 0
    largest = _largest_tensor(shape)
    call = gather_windows(shape, cfg.zero)["prefetch_bucket_size"] + largest
    return min(call, shape.total) * BYTES[cfg.model.dtype]


def per_rank(shape: Shape, cfg, lay: Layout) -> dict:
    """Per-rank bytes by component; `total` is what the accelerator holds (on CPU the host is the accelerator,
    so only what goes to NVMe leaves it)."""
    z = zero_settings(cfg, lay, shape)
    d, step = model_states(shape.tensors, cfg, lay, z)
    d["optimizer_step"] = step
    d["zero3_gather_buffers"] = gather_buffers(shape, cfg, lay)
    d["zero3_gather_staging"] = gather_staging(shape, cfg, lay)
    d.update(activations(shape, cfg, lay))
    d["framework_overhead"] = FRAMEWORK_OVERHEAD[lay.device]
    whole = sum(v for k, v in d.items() if k != "model_states")
    d.update(offload(d, z, cfg))
    # on CPU the host is the accelerator: only what goes to NVMe leaves it, and the swap buffers are extra
    away = d["offload_nvme"] + (d["offload_host_ram"] if lay.device != "cpu" else -d["offload_swap_buffers"])
    d["total"] = whole - away
    return d


def storage(ts, cfg, n_tasks: int = 100) -> dict:
    train = sum(n for _, n, t, _ in ts if t)
    total = sum(n for _, n, _, _ in ts)
    merged = total * BYTES[cfg.model.dtype]
    adapter = train * 4
    return {"adapter_fp32": adapter, "adapter_fp16": train * 2, "resume_state": 2 * 4 * train,
            "merged_model": merged, "n_tasks": n_tasks, "n_tasks_adapters": merged + n_tasks * train * 2,
            "n_tasks_full_copies": n_tasks * merged}


def fewest_ranks(shape: Shape, cfg, lay: Layout, budget: int, limit: int = 1 << 20) -> int | None:
    """Smallest world size whose per-rank total fits the budget (ZeRO-3 only shrinks with more ranks)."""
    def fits(w):
        return per_rank(shape, cfg, dataclasses.replace(lay, world=w))["total"] <= budget
    if not fits(limit):
        return None
    lo, hi = 0, 1
    while not fits(hi):
        lo, hi = hi, hi * 2
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid, hi)
    return hi


def largest_micro_batch(shape: Shape, cfg, lay: Layout, budget: int, limit: int = 4096) -> int:
    """Largest micro-batch that fits on this layout (0 if not even one sequence fits)."""
    def fits(b):
        return per_rank(shape, cfg, dataclasses.replace(lay, micro_batch=b))["total"] <= budget
    best = 0
    b = 1
    while b <= limit and fits(b):
        best, b = b, b * 2
    lo, hi = best, min(b, limit + 1)
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    return lo


def estimate(cfg, lay: Layout, gpu_memory: int | None = None, fit: bool = False) -> dict:
    """Everything `bigadapt estimate` prints, for the run's method and for full fine-tuning beside it."""
    z = zero_settings(cfg, lay)
    out = {"layout": vars(lay).copy(), "attn_implementation": None,
           "persistence_threshold": z.get("stage3_param_persistence_threshold"),
           "offload": {k: _device(z, f"offload_{k}") for k in ("optimizer", "param")}}
    for key, shape in zip(("method", "full_finetune"), shapes(cfg)):
        train = sum(n for _, n, t, _ in shape.tensors if t)
        entry = {"name": "full" if key == "full_finetune" else cfg.method.name, "params_total": shape.total,
                 "trainable": train, "trainable_pct": 100 * train / shape.total,
                 "per_rank": per_rank(shape, cfg, lay)}
        if key == "method":
            entry["storage"] = storage(shape.tensors, cfg)
            out["attn_implementation"] = attention(shape, cfg)
        if gpu_memory:
            entry["fewest_ranks"] = fewest_ranks(shape, cfg, lay, gpu_memory)
            if fit:
                entry["largest_micro_batch"] = largest_micro_batch(shape, cfg, lay, gpu_memory)
        out[key] = entry
    out["ratio_total"] = out["method"]["per_rank"]["total"] / out["full_finetune"]["per_rank"]["total"]
    out["ratio_model_states"] = (out["method"]["per_rank"]["model_states"]
                                 / out["full_finetune"]["per_rank"]["model_states"])
    return out


def compare(predicted: dict, measured: dict) -> list[tuple[str, int, int, float]]:
    """[(component, predicted bytes, measured bytes, relative error)] for the model-state components."""
    rows = []
    for key, meas in measured.items():
        pred = predicted.get(key, 0)
        rows.append((key, pred, meas, (pred - meas) / meas if meas else (0.0 if pred == 0 else math.inf)))
    return rows
