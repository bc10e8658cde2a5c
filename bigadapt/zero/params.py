"""A parameter under ZeRO-3 (true shape and size, this rank's slice), the process group (rank, size, collectives
over small values), loading under zero.Init, and gathering a few parameters whole. Part of `bigadapt.zero`:
import it from there."""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist

_hf_ds_config = None  # transformers holds only a weak reference: keep it alive while loading


def is_zero(p: torch.Tensor) -> bool:
    return hasattr(p, "ds_id")


def full_shape(p: torch.Tensor) -> tuple[int, ...]:
    return tuple(p.ds_shape) if is_zero(p) else tuple(p.shape)


def full_numel(p: torch.Tensor) -> int:
    return int(p.ds_numel) if is_zero(p) else p.numel()


def local_numel(p: torch.Tensor) -> int:
    """Elements this rank stores for p (its partition under ZeRO-3, all of it otherwise)."""
    return int(p.ds_tensor.numel()) if is_zero(p) else p.numel()


def local_bytes(p: torch.Tensor) -> int:
    return local_numel(p) * (p.ds_tensor.element_size() if is_zero(p) else p.element_size())


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def register_for_loading(ds_config: dict) -> None:
    """Make transformers build/load under zero.Init, so each rank keeps only its partition while reading.

    Must happen before from_pretrained/from_config, and every later from_pretrained is then a collective.
    """
    global _hf_ds_config
    stage = ds_config.get("zero_optimization", {}).get("stage", 0)
    if stage == 3:
        from transformers.integrations import HfDeepSpeedConfig
        _hf_ds_config = HfDeepSpeedConfig(ds_config)


def registered_stage() -> int:
    """3 while a ZeRO-3 config is registered for loading (every from_pretrained is then a collective), else 0."""
    return 3 if _hf_ds_config is not None else 0


def registered_config() -> dict | None:
    """The DeepSpeed config registered for loading (what zero.Init partitions with), or None."""
    return _hf_ds_config.config if _hf_ds_config is not None else None


def unregister() -> None:
    global _hf_ds_config
    if _hf_ds_config is not None:
        from transformers.integrations.deepspeed import unset_hf_deepspeed_config
        unset_hf_deepspeed_config()
        _hf_ds_config = None


@contextlib.contextmanager
def loading_paused():
    """Build outside zero.Init for a moment (e.g. a model that must be saved whole), then re-register."""
    held = _hf_ds_config
    if held is None:
        yield
        return
    unregister()
    try:
        yield
    finally:
        register_for_loading(held.config)


@contextlib.contextmanager
def gathered(params, modify: bool = False):
    """*Collective.* Make exactly these params whole for the block; yields whether this rank may write them.

    With modify=True rank 0's writes are broadcast and re-partitioned on exit. Params that are not ZeRO-3
    partitioned are already whole: every rank writes its own copy.
    """
    zp = [p for p in params if is_zero(p)]
    if not zp:
        yield True
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(zp, modifier_rank=0 if modify else None):
        yield rank() == 0 or not modify


def use_in_forward(module: torch.nn.Module, param: torch.nn.Parameter) -> None:
    """Have ZeRO-3 gather `param` (owned by another module, e.g. a wrapped base layer's weight) for `module`'s
    forward and backward, and release it after: DeepSpeed otherwise gathers a parameter only inside its owner's
    forward. Only this one module's tensor is gathered. Registering is inert without ZeRO-3 (and works on a model
    partitioned later by deepspeed.initialize), so it is done unconditionally."""
    from deepspeed.runtime.zero.partition_parameters import register_external_parameter
    register_external_parameter(module, param)


def _comm_device() -> torch.device:
    # NCCL moves only GPU tensors; gloo (CPU runs) only host ones
    if world_size() > 1 and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_gather_object(obj) -> list:
    if world_size() == 1:
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def all_reduce_max_list(values: list[float]) -> list[float]:
    """*Collective.* Element-wise max over ranks in one reduction: how ranks agree on stop requests (any rank's
    signal stops every rank), a spent budget and eval marks."""
    if world_size() == 1:
        return [float(v) for v in values]
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.tolist()


def all_reduce_sum(values: list[float]) -> list[float]:
    if world_size() == 1:
        return list(values)
    t = torch.tensor(values, dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return t.tolist()
