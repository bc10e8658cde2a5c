"""DeepSpeed: the process group, the config built from the run config, and initialize().

The optimizer is a plain torch AdamW over the trainable parameters only, so the frozen base gets no fp32
master, no gradient buffer and no optimizer state, and nothing needs a JIT-compiled op on CPU.
"""
from __future__ import annotations

import atexit
import os
import socket

import torch

from . import zero

PRECISION = {"bf16": "bf16", "fp16": "fp16"}  # fp32 -> no mixed-precision section


def init_distributed() -> None:
    """Join the process group the launcher set up (deepspeed/torchrun/srun), or make a one-rank group."""
    import deepspeed
    if "RANK" not in os.environ and "OMPI_COMM_WORLD_RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=os.environ.get("MASTER_PORT") or str(_free_port()))
    _set_threads()
    _skip_shm_comm_build()
    deepspeed.init_distributed(dist_backend=_backend(), auto_mpi_discovery=False, verbose=False)
    atexit.unregister(_leave_group)  # several runs may share one process: leave it once, at exit
    atexit.register(_leave_group)


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


def zero_stage(cfg, world_size: int) -> int:
    return cfg.zero.stage if cfg.zero.stage is not None else (3 if world_size >= 2 else 0)


def ds_config(cfg, world_size: int, accumulation: int, shape=None) -> dict:
    """The DeepSpeed config; `shape` (accounting.Shape, required for ZeRO-3) sizes the gradient-reduction
    bucket and the gather windows."""
    from .accounting import gather_windows, reduce_bucket_elements
    stage = zero_stage(cfg, world_size)
    conf = {
        "train_micro_batch_size_per_gpu": cfg.train.micro_batch,
        "gradient_accumulation_steps": accumulation,
        "train_batch_size": cfg.train.batch_size,
        "gradient_clipping": cfg.train.clip,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
        "zero_allow_untested_optimizer": True,  # torch AdamW: no JIT-built op needed
        "zero_optimization": {"stage": stage},
    }
    if shape is not None and stage > 0:
        # DeepSpeed allocates reduce_bucket_size (5e8 elements: 2 GB in fp32) up front on every rank;
        # an adapter never fills more than its own size
        conf["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_elements(
            sum(n for _, n, t, _ in shape.tensors if t))
    if stage == 3:
        if shape is None:
            raise ValueError("ds_config: ZeRO-3 needs the model's shape to size its gather windows")
        w = gather_windows(shape, cfg.zero)
        conf["zero_optimization"].update(
            stage3_param_persistence_threshold=cfg.zero.param_persistence_threshold,
            stage3_prefetch_bucket_size=w["prefetch_bucket_size"],
            stage3_max_live_parameters=w["max_live_parameters"],
            stage3_max_reuse_distance=w["max_reuse_distance"],
            stage3_gather_16bit_weights_on_model_save=False,  # never gather the base to save
        )
    if cfg.model.dtype in PRECISION:
        conf[PRECISION[cfg.model.dtype]] = {"enabled": True}
    return conf


def param_groups(model, weight_decay: float) -> list[dict]:
    """Trainable params only; no decay on biases and norms (the usual AdamW practice)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            (no_decay if p.ndim < 2 or name.endswith(".bias") else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


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
    groups = param_groups(model, cfg.train.weight_decay)
    fused = torch.cuda.is_available()
    optimizer = torch.optim.AdamW(groups, lr=cfg.train.lr, betas=tuple(cfg.train.adam_betas),
                                  eps=cfg.train.adam_eps, fused=fused or None, foreach=None if fused else True)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=conf,
                                                   model_parameters=[p for g in groups for p in g["params"]])
    zero.ensure_adam_state(optimizer, 0)
    zero.coalesce_persistent_gather(optimizer)
    return engine, optimizer
