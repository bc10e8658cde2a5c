"""DeepSpeed: the process group, the config built from the run config, and initialize().

The optimizer is a plain torch AdamW over the trainable parameters only, so the frozen base gets no fp32
master, no gradient buffer and no optimizer state, and nothing needs a JIT-compiled op on CPU.
"""
from __future__ import annotations

import atexit
import json
import os
import socket
from pathlib import Path

import torch

from . import zero
from .errors import ConfigError

PRECISION = {"bf16": "bf16", "fp16": "fp16"}  # fp32 -> no mixed-precision section


def init_distributed() -> None:
    """Join the process group the launcher set up (deepspeed/torchrun/srun), or make a one-rank group."""
    import deepspeed
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    _set_threads()
    return_freed_memory()
    _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=_backend(), auto_mpi_discovery=False, verbose=False)
    atexit.unregister(_leave_group)  # several runs may share one process: leave it once, at exit
    atexit.register(_leave_group)


MALLOC_THRESHOLD = 128 * 1024  # bytes: blocks above it are mmap'd and unmapped on free; free tops above it trimmed
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc mallopt parameter numbers (malloc.h)


def return_freed_memory() -> dict:
    """On CPU, make glibc give freed memory back to the system. ZeRO-3 gathers each block's weights into fresh
    buffers and frees them after use; glibc keeps freed blocks for reuse (its mmap threshold grows with every
    large free), so a rank's RSS crept from 1.65 to 4.87 GiB over a few steps at 1.14B parameters while the
    accounting predicted ~2 GiB. With both thresholds at 128 KiB it stayed near 2.0 GiB. Left alone when the
    user set MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_ (glibc read those at start), on GPU (gather buffers
    live in the CUDA caching allocator) and off glibc. Returns what was set, for tests and the run log."""
    import ctypes
    import ctypes.util
    if torch.cuda.is_available():
        return {}
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return {}  # not glibc (musl, macOS): nothing to set
    done = {}
    for env, param in (("MALLOC_MMAP_THRESHOLD_", _M_MMAP_THRESHOLD), ("MALLOC_TRIM_THRESHOLD_", _M_TRIM_THRESHOLD)):
        if env not in os.environ and mallopt(param, MALLOC_THRESHOLD) == 1:
            done[env] = MALLOC_THRESHOLD
    return done


def _skip_shm_comm_build() -> None:
    """On CPU, DeepSpeed JIT-compiles its shared-memory comm op (~40-60 s on 2 cores, a C++ toolchain needed)
    the first time a process group starts. The op serves only `inference_all_reduce` (tensor-parallel
    inference kernels), which training never calls: ZeRO's collectives go through torch.distributed. Marking
    it incompatible makes DeepSpeed skip the build, so a fresh install trains at once."""
    if torch.cuda.is_available():
        return
    import deepspeed.ops
    compatible = getattr(deepspeed.ops, "__compatible_ops__", None)
    if isinstance(compatible, dict):
        compatible["deepspeed_shm_comm"] = False


def _leave_group() -> None:
    """At interpreter exit, while Python is still whole: a rank must not abort after a run that succeeded.

    A gloo worker thread frees a finished collective's tensors *after* the caller's wait() has returned, and
    needs the GIL to do it. A rank that exits right after its last collective (rank 1 after the accounting
    gather) can reach interpreter finalization first; the worker then takes the GIL during finalization,
    Python ends the thread mid-unwind and C++ aborts the process ('terminate called without an active
    exception', exit -6; seen in core dumps: ~AsyncAllgatherWork in ProcessGroupGloo::runLoop). Sleeping
    releases the GIL so such a thread finishes first. No barrier: after an error, ranks reach exit at
    different points."""
    import time

    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        time.sleep(0.2)
        dist.destroy_process_group()


def _backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def _set_threads() -> None:
    # N ranks on a CPU-only host share its cores: one rank using all of them oversubscribes (2x slower)
    if torch.cuda.is_available() or "OMP_NUM_THREADS" in os.environ:
        return
    local = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, local)))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def zero_stage(cfg, world_size: int, shape=None) -> int:
    """zero.stage as a number: as set; null -> 3 with two or more ranks, else 0; auto -> what bigadapt/layout.py
    predicts fastest within the memory budget. A run resolves it once (layout.resolve) and passes that on."""
    if isinstance(cfg.zero.stage, int):
        return cfg.zero.stage
    from . import layout
    return layout.choose(cfg, layout.run_layout(cfg, world_size), shape).stage


def ds_config(cfg, world_size: int, accumulation: int, shape=None) -> dict:
    """The DeepSpeed config: bigadapt's keys with the user's `zero.deepspeed_config` merged under them
    (merge_user). `shape` (accounting.Shape, required for ZeRO-3) sizes the reduction bucket and gather windows."""
    if shape is None and cfg.zero.stage == 3:
        raise ValueError("ds_config: ZeRO-3 needs the model's shape to size its gather windows")
    if cfg.zero.stage not in (0, 1, 2):
        # auto, null or 3: the stage and the ZeRO-3 windows layout.py takes (from the memory budget, when known).
        # A config resolved once already resolves to itself: its windows are explicit then
        from . import layout
        cfg = layout.resolve(cfg, layout.run_layout(cfg, world_size), shape)[0]
    stage = cfg.zero.stage
    check_runnable(cfg, stage)
    if stage == 3 and shape is None:
        raise ValueError("ds_config: ZeRO-3 needs the model's shape to size its gather windows")
    user = user_config(cfg)
    conf = merge_user(_top(cfg, accumulation), SOFT, {k: v for k, v in user.items() if k != "zero_optimization"},
                      where=_json_key(cfg))
    conf["zero_optimization"] = zero_section(cfg, stage, shape, user)
    return conf


def _top(cfg, accumulation: int | None) -> dict:
    ours = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.train.batch_size,
        "gradient_clipping": cfg.train.clip,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built op needed
        "zero_force_ds_cpu_optimizer": False,  # with offload, torch AdamW steps the host partitions (no cpu_adam)
        **{name: {"enabled": cfg.model.dtype == name} for name in PRECISION.values()},
    }
    return {k: v for k, v in ours.items() if v is not None}


SOFT = {"steps_per_print": 10**9, "wall_clock_breakdown": False}  # defaults the user's JSON may change
WINDOWS = ("stage3_prefetch_bucket_size", "stage3_max_live_parameters", "stage3_max_reuse_distance")


def check_user_config(cfg) -> None:
    """For validate(): the user's JSON read, and every conflict found that needs neither the world size (the
    accumulation steps, a stage left to it) nor the model (the gather windows); the rest is refused when the
    accounting or ds_config merges it, still before the process group."""
    user = user_config(cfg)
    if not user:
        return
    top = {k: v for k, v in user.items() if k not in ("zero_optimization", "gradient_accumulation_steps")}
    merge_user(_top(cfg, None), SOFT, top, where=_json_key(cfg))
    if isinstance(cfg.zero.stage, int):  # auto/null: checked once the stage is known (ds_config)
        section = {k: v for k, v in user.get("zero_optimization", {}).items() if k not in WINDOWS}
        zero_section(cfg, cfg.zero.stage, None, {"zero_optimization": section})


def zero_section(cfg, stage: int, shape=None, user: dict | None = None) -> dict:
    """The `zero_optimization` section DeepSpeed gets, the user's keys merged in: what the accounting reads."""
    from .accounting import gather_windows, reduce_bucket_elements
    ours, soft = {"stage": stage}, {}
    if shape is not None and stage > 0:
        # DeepSpeed allocates reduce_bucket_size (5e8 elements: 2 GB in fp32) up front on every rank;
        # an adapter never fills more than its own size
        soft["reduce_bucket_size"] = reduce_bucket_elements(sum(n for _, n, t, _ in shape.tensors if t))
    if stage == 3:
        thr = cfg.zero.param_persistence_threshold  # None: the JSON's value, else DeepSpeed's default
        (soft if thr is None else ours)["stage3_param_persistence_threshold"] = DS_PERSISTENCE if thr is None else thr
        ours["stage3_gather_16bit_weights_on_model_save"] = False  # never gather the base to save
        if shape is not None:
            ours.update({f"stage3_{k}": v for k, v in gather_windows(shape, cfg.zero).items()})
    for key in ("offload_optimizer", "offload_param"):
        device = getattr(cfg.zero, key)
        if device != "none":
            ours[key] = {"device": device, **({"nvme_path": cfg.zero.nvme_path} if device == "nvme" else {})}
            soft[key] = {"pin_memory": torch.cuda.is_available()}  # pinned host memory needs a GPU
    section = (user_config(cfg) if user is None else user).get("zero_optimization", {})
    if not isinstance(section, dict):
        raise ConfigError(f"{_json_key(cfg)} zero_optimization: expected an object, got {section!r}")
    return merge_user(ours, soft, section, "zero_optimization.", _json_key(cfg))


DS_PERSISTENCE = 100_000  # DeepSpeed's default stage3_param_persistence_threshold
# Keys bigadapt computes: a user value that differs is refused, naming what to set instead. Everything else in
# the user's JSON passes through (monitor, comms_logger, ZeRO++ quantization, offload buffer sizes, ...).
OWNED = {
    "train_micro_batch_size_per_gpu": "train.micro_batch",
    "gradient_accumulation_steps": "train.batch_size (accumulation = batch_size / (micro_batch x ranks))",
    "train_batch_size": "train.batch_size",
    "gradient_clipping": "train.clip",
    "optimizer": "train.lr, train.adam_betas, train.adam_eps, train.weight_decay (bigadapt builds AdamW)",
    "scheduler": "train.schedule, train.warmup_steps, train.min_lr_ratio (bigadapt sets the lr each step)",
    "bf16.enabled": "model.dtype",
    "fp16.enabled": "model.dtype",
    "zero_allow_untested_optimizer": "nothing (bigadapt passes its own AdamW)",
    "zero_force_ds_cpu_optimizer": "nothing (bigadapt steps offloaded states with torch AdamW)",
    "zero_optimization.stage": "zero.stage",
    "zero_optimization.stage3_param_persistence_threshold": "zero.param_persistence_threshold",
    "zero_optimization.stage3_prefetch_bucket_size": "zero.prefetch_bucket_size",
    "zero_optimization.stage3_max_live_parameters": "zero.max_live_parameters",
    "zero_optimization.stage3_max_reuse_distance": "zero.max_reuse_distance",
    "zero_optimization.stage3_gather_16bit_weights_on_model_save": "nothing (bigadapt saves the adapter itself)",
    "zero_optimization.offload_optimizer.device": "zero.offload_optimizer",
    "zero_optimization.offload_optimizer.nvme_path": "zero.nvme_path",
    "zero_optimization.offload_param.device": "zero.offload_param",
    "zero_optimization.offload_param.nvme_path": "zero.nvme_path",
}


def merge_user(ours: dict, soft: dict, user: dict, prefix: str = "", where: str = "zero.deepspeed_config") -> dict:
    """`user` merged under bigadapt's keys. `ours`: computed, an OWNED key must agree; `soft`: defaults the user
    may change; "auto" takes either; other keys pass through. A conflict is a one-line ConfigError."""
    out = _deep_merge(soft, ours)
    for key, value in user.items():
        path, mine = prefix + key, out.get(key)
        if value == "auto":
            if key not in out:
                raise ConfigError(f"{where} {path}: \"auto\" is filled only for keys bigadapt computes here "
                                  f"({', '.join(sorted(out)) or 'none'}); give a value or remove it")
        elif isinstance(value, dict) and (isinstance(mine, dict) or any(k.startswith(path + ".") for k in OWNED)):
            out[key] = merge_user(ours.get(key) or {}, soft.get(key) or {}, value, path + ".", where)
        elif path in OWNED and key not in soft and not _same(value, ours.get(key)):
            raise ConfigError(f"{where} {path}={json.dumps(value)} conflicts with bigadapt's "
                              f"{json.dumps(ours.get(key))}: set {OWNED[path]} instead and remove it from the JSON")
        else:
            out[key] = value
    return out


def _same(user, ours) -> bool:
    # bigadapt writes no offload section for "none": a user's {"device": "none"} says the same
    return user == ours or (ours is None and user in ("none", False))


def _deep_merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for k, v in high.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _json_key(cfg) -> str:
    return f"zero.deepspeed_config={cfg.zero.deepspeed_config}:"


def user_config(cfg) -> dict:
    """The user's DeepSpeed JSON ({} when none); a missing or malformed file is one ConfigError line."""
    path = cfg.zero.deepspeed_config
    if not path:
        return {}
    try:
        raw = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise ConfigError(f"zero.deepspeed_config={path}: no such file") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ConfigError(f"zero.deepspeed_config={path}: cannot read it ({e})") from None
    except json.JSONDecodeError as e:
        raise ConfigError(f"zero.deepspeed_config={path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"zero.deepspeed_config={path}: the top level must be a JSON object of DeepSpeed keys")
    return raw


def check_runnable(cfg, stage: int) -> None:
    """Offload settings DeepSpeed refuses or this machine cannot run, said in one line before DeepSpeed starts.
    validate() refuses what the config alone rules out; this needs the stage (from the world size) and the
    machine (libaio for nvme)."""
    z = cfg.zero
    if z.offload_param != "none" and stage != 3:
        raise ConfigError(f"zero.offload_param={z.offload_param}: parameter offload needs ZeRO stage 3, this run "
                          f"uses stage {stage}; set zero.stage=3 or zero.offload_param=none")
    if z.offload_optimizer != "none" and stage == 0:
        raise ConfigError(f"zero.offload_optimizer={z.offload_optimizer}: optimizer offload needs ZeRO stage 1-3, "
                          f"this run uses stage 0 (one rank); set zero.stage")
    if z.offload_optimizer == "nvme" and stage != 3:
        raise ConfigError(f"zero.offload_optimizer=nvme: NVMe offload needs ZeRO stage 3, this run uses stage "
                          f"{stage}; set zero.stage=3 or zero.offload_optimizer=cpu")
    if "nvme" in (z.offload_optimizer, z.offload_param) and not _aio_available():
        raise ConfigError("zero.offload_*=nvme: DeepSpeed's async I/O op needs libaio, which this machine lacks; "
                          "install libaio-dev (apt) or use cpu offload")


def _aio_available() -> bool:
    from deepspeed.ops.op_builder import AsyncIOBuilder
    try:
        return bool(AsyncIOBuilder().is_compatible(verbose=False))
    except Exception:  # an op builder that cannot even probe: treat as missing
        return False


def param_groups(model, weight_decay: float, lr_ratio: float = 1.0, lr: float | None = None) -> list[dict]:
    """Trainable params only; no decay on biases and norms (the usual AdamW practice). LoRA+ (`lr_ratio` != 1,
    Hayou et al. 2024): every `lora_B` in groups of its own whose `lr_ratio` the loop multiplies the schedule's lr
    by (peft's create_loraplus_optimizer also gives 1-D tensors B's rate; here only B, the paper's definition)."""
    groups = {}  # (decay, is B) -> params
    for name, p in model.named_parameters():
        if p.requires_grad:
            decay = not (p.ndim < 2 or name.endswith(".bias"))
            is_b = lr_ratio != 1.0 and name.rpartition(".")[2] == "lora_B"
            groups.setdefault((decay, is_b), []).append(p)
    out = []
    for is_b in (False, True):
        for decay in (True, False):
            if groups.get((decay, is_b)):
                ratio = lr_ratio if is_b else 1.0
                g = {"params": groups[(decay, is_b)], "weight_decay": weight_decay if decay else 0.0,
                     "lr_ratio": ratio}
                out.append(g if lr is None else dict(g, lr=lr * ratio))
    return out


def uniform_working_dtype(model, cfg) -> None:
    """Give the method's new tensors the base dtype: DeepSpeed's mixed precision keeps one working dtype for
    every trainable tensor (ZeRO-3 asserts it) and the fp32 masters in the optimizer. Base tensors made
    trainable (a task head, BitFit's biases) already have it; casting them to fp32 would break their
    modules' forward instead."""
    from .model import DTYPES
    work = DTYPES[cfg.model.dtype]
    for name, p in model.named_parameters():
        if p.requires_grad and p.dtype != work:
            if zero.is_zero(p):
                raise RuntimeError(f"{name}: a partitioned trainable tensor in {p.dtype}, base dtype {work}")
            p.data = p.data.to(work)


def initialize(model, cfg, conf: dict):
    import deepspeed
    uniform_working_dtype(model, cfg)
    groups = param_groups(model, cfg.train.weight_decay, cfg.method.lr_ratio, cfg.train.lr)
    fused = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                  eps=cfg.train.adam_eps, fused=fused or None, foreach=None if fused else True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf,
                                                   model_parameters=[p for g in groups for p in g["params"]])
    zero.ensure_adam_state(optimizer, 0)
    zero.coalesce_persistent_gather(optimizer)
    return engine, optimizer
