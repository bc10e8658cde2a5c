"""Every ZeRO-3 detail in one place (this package).

Under ZeRO-3 a parameter's `.data` is an empty placeholder: its true shape is `ds_shape`, this rank's
slice is `ds_tensor`, and the fp32 master and Adam moments live in the optimizer's flat partitions.
Everything else in bigadapt asks this package, so the rest of the code reads as if parameters were whole.
Functions marked *collective* must be called by every rank in the same order.

`params`: shapes, ranks, loading and gathering; `optim`: masters, optimizer state and loss scale; here: sampled
elements, collectives over small values, what each rank holds and measures.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist

from .convert import Partitioner, load_device  # noqa: F401  (re-exported: callers use bigadapt.zero.X)
from .optim import (  # noqa: F401  (re-exported: callers use bigadapt.zero.X)
    SCALER_FIELDS,
    ensure_adam_state,
    full_master,
    full_optimizer_state,
    link_fp32_copies,
    loss_scale_state,
    master_params,
    optimizer_step,
    set_loss_scale_state,
    set_master,
    set_optimizer_state,
    set_param,
    torch_optimizer,
)
from .params import (  # noqa: F401
    _comm_device,
    all_gather_object,
    all_reduce_max_list,
    all_reduce_sum,
    barrier,
    full_numel,
    full_shape,
    gathered,
    is_zero,
    loading_paused,
    local_bytes,
    local_numel,
    rank,
    register_for_loading,
    registered_stage,
    unregister,
    use_in_forward,
    world_size,
)


def leading_elements(p: torch.Tensor, k: int) -> torch.Tensor:
    """*Collective.* The first k elements of the flattened full parameter, identical on every rank.

    They sit in rank 0's partition whenever the partition is at least k long, so nothing is gathered for
    large tensors; small ones are gathered whole. The answer does not depend on the world size.
    """
    k = min(k, full_numel(p))
    if not is_zero(p):
        return p.detach().reshape(-1)[:k].float().cpu()
    if math.ceil(full_numel(p) / world_size()) < k:
        with gathered([p]):
            return p.detach().reshape(-1)[:k].float().cpu()
    buf = p.ds_tensor.detach().reshape(-1)[:k].float().clone().to(_comm_device())
    if world_size() > 1:
        dist.broadcast(buf, src=0)
    return buf.cpu()


def sample_elements(params: list, positions: list[list[int]]) -> torch.Tensor:
    """*Collective.* The elements of each full parameter at its flat `positions`, concatenated, float64 (exact
    for every stored dtype), identical on every rank and for any world size.

    Under ZeRO-3 each rank reads only the positions that fall in its own partition (`ds_tensor`, which starts
    at rank * partition size) and one all-reduce over the small sample adds the ranks' parts: nothing is
    gathered, whatever the model's size.
    """
    reduce = world_size() > 1 and any(is_zero(p) for p in params)
    parts = [_local_sample(p, idx, reduce) for p, idx in zip(params, positions)]
    buf = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)
    if reduce:
        buf = buf.to(_comm_device())
        dist.all_reduce(buf)  # each position is held by exactly one rank, the others add zeros: exact
        buf = buf.cpu()
    return buf + 0.0  # -0.0 and +0.0 alike, whichever rank held the element


def _local_sample(p: torch.Tensor, idx: list[int], reduce: bool) -> torch.Tensor:
    """This rank's share of the sample: the positions it holds, zeros elsewhere."""
    out = torch.zeros(len(idx), dtype=torch.float64)
    start = _partition_start(p)
    if start is None:  # whole on every rank (or an unusual partition group, gathered: collective): rank 0 adds it
        with gathered([p]):
            flat = p.detach().reshape(-1)
            value = flat[torch.tensor(idx, dtype=torch.long, device=flat.device)].double().cpu()
        return out if reduce and rank() != 0 else value
    size = p.ds_tensor.ds_numel
    mine = [(k, i - start) for k, i in enumerate(idx) if start <= i < start + size]
    if mine:
        slots, offsets = zip(*mine)
        local = p.ds_tensor.detach().reshape(-1)
        out[list(slots)] = local[torch.tensor(offsets, dtype=torch.long, device=local.device)].double().cpu()
    return out


def _partition_start(p: torch.Tensor) -> int | None:
    """Where this rank's ZeRO-3 partition of p begins in the flat parameter; None when p is not partitioned over
    exactly the world (not ZeRO-3, or hierarchical/MiCS groups where partitions repeat across replicas)."""
    if not is_zero(p) or getattr(p.ds_tensor, "ds_numel", None) is None:
        return None
    if world_size() == 1:
        return 0
    group = getattr(p, "ds_process_group", None)
    if dist.get_world_size(group=group) != world_size():
        return None
    return p.ds_tensor.ds_numel * dist.get_rank(group=group)


def local_partition(p: torch.Tensor) -> tuple[int, torch.Tensor] | None:
    """(where this rank's slice begins in the flattened parameter, the slice as a flat tensor to write into), or
    None when p has no plain local ZeRO-3 partition (not ZeRO-3, NVMe offload, hierarchical partitioning): then
    write it whole (`set_param`). The slice may run past the end of the parameter: DeepSpeed's zero padding."""
    start = _partition_start(p)
    if start is None or p.ds_tensor.numel() != p.ds_tensor.ds_numel:
        return None
    return start, p.ds_tensor.data.view(-1)


def rank_holdings(model, optimizer) -> dict:
    """*Collective.* What this rank actually stores: base partition, trainable partition, optimizer state.

    Read from DeepSpeed's partition metadata (ds_tensor) and the optimizer's state tensors, not predicted.
    """
    base = [p for p in model.parameters() if not p.requires_grad]
    train = [p for p in model.parameters() if p.requires_grad]
    inner = torch_optimizer(optimizer)
    opt_tensors = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    masters = master_params(optimizer)
    mine = {
        "rank": rank(),
        "base_numel": sum(local_numel(p) for p in base),
        "base_bytes": sum(local_bytes(p) for p in base),
        "trainable_numel": sum(local_numel(p) for p in train),
        "master_numel": sum(p.numel() for p in masters),
        "optimizer_state_numel": sum(t.numel() for t in opt_tensors),
        "optimizer_state_bytes": sum(t.numel() * t.element_size() for t in opt_tensors),
    }
    return {"world_size": world_size(),
            "base_numel_total": sum(full_numel(p) for p in base),
            "trainable_numel_total": sum(full_numel(p) for p in train),
            "ranks": all_gather_object(mine)}


def _unique_bytes(tensors) -> int:
    """Bytes of distinct storages (views of one flat buffer count once)."""
    seen, total = set(), 0
    for t in tensors:
        if t is None or not torch.is_tensor(t) or t.numel() == 0:
            continue
        s = t.untyped_storage()
        if s.data_ptr() not in seen:
            seen.add(s.data_ptr())
            total += s.nbytes()
    return total


# DeepSpeed releases whose private Stage3 `_post_step(self, timer_names)` gathers `self.persistent_parameters`
# after the step, as coalesce_persistent_gather assumes (checked by post_step_contract; tests/test_layout.py
# fails on any other installed release, so an upgrade is looked at instead of silently losing the coalescing)
COALESCE_VERIFIED = ("0.19.8",)


def post_step_contract() -> str | None:
    """What in the installed DeepSpeed breaks the private contract the coalescing wraps, or None."""
    import inspect

    from deepspeed.runtime.zero.stage3 import DeepSpeedZeroOptimizer_Stage3 as Stage3
    fn = _unwrapped(getattr(Stage3, "_post_step", None))
    if fn is None:
        return "DeepSpeedZeroOptimizer_Stage3._post_step is gone"
    if list(inspect.signature(fn).parameters) != ["self", "timer_names"]:
        return f"_post_step{inspect.signature(fn)} is not (self, timer_names)"
    if "self.persistent_parameters[0].all_gather(self.persistent_parameters)" not in inspect.getsource(fn):
        return "_post_step no longer gathers self.persistent_parameters"
    if "self._post_step(" not in inspect.getsource(_unwrapped(Stage3.step)):
        return "step() no longer calls _post_step"
    return None


def _unwrapped(fn):
    """The function under DeepSpeed's instrument_w_nvtx (a closure over `func`) or functools wrappers."""
    while fn is not None:
        code = getattr(fn, "__code__", None)
        cells = dict(zip(code.co_freevars, fn.__closure__ or ())) if code else {}
        inner = getattr(fn, "__wrapped__", None) or (cells["func"].cell_contents if "func" in cells else None)
        if inner is None:
            return fn
        fn = inner
    return fn


def coalesce_persistent_gather(optimizer) -> bool:
    """DeepSpeed re-partitions every parameter as each optimizer step begins and, after it, re-gathers the
    persistent ones (below param_persistence_threshold: norms, biases, a LoRA's A and B) with a collective
    call per tensor: ~8 per block per step. This gathers them after each step in one call per dtype instead,
    into a buffer holding only them. Same values; `bigadapt bench peft` counts the calls (98 -> 36 per step
    on its 6-block GPT-2). Only on the DeepSpeed releases it was verified on (COALESCE_VERIFIED): it wraps a
    private method. Returns whether it did."""
    import deepspeed
    persistent = getattr(optimizer, "persistent_parameters", None)  # the list DeepSpeed's _post_step gathers
    if (not persistent or not hasattr(optimizer, "_post_step")  # not ZeRO-3, or nothing persistent
            or deepspeed.__version__ not in COALESCE_VERIFIED):  # another DeepSpeed: leave it its own way
        return False
    ours = [p for p in persistent if p.ds_tensor.dtype.is_floating_point and not hasattr(p.ds_tensor, "ds_quant_scale")
            and p.ds_process_group is persistent[0].ds_process_group]
    taken = {id(p) for p in ours}
    persistent[:] = [p for p in persistent if id(p) not in taken]  # the rest (quantized, other groups): DeepSpeed's
    groups = [[p for p in ours if p.ds_tensor.dtype == dtype]  # model order: the same on every rank
              for dtype in dict.fromkeys(p.ds_tensor.dtype for p in ours)]
    post_step = optimizer._post_step

    def _post_step(*args, **kwargs):
        post_step(*args, **kwargs)
        for params in groups:
            _gather_whole(params)

    optimizer._post_step = _post_step  # called by the optimizer's step(), after the update
    return True


def _gather_whole(params: list) -> None:
    from deepspeed import comm as dist
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
    group = params[0].ds_process_group
    world = dist.get_world_size(group=group)
    local = torch.cat([p.ds_tensor.reshape(-1) for p in params])  # each rank's partitions, padded alike
    out = torch.empty(world * local.numel(), dtype=local.dtype, device=local.device)
    dist.all_gather_into_tensor(out, local, group=group)
    rows, offset = out.view(world, -1), 0
    for p in params:
        size = p.ds_tensor.numel()
        p.data = rows[:, offset:offset + size].reshape(-1)[:p.ds_numel].view(p.ds_shape)
        p.ds_status = ZeroParamStatus.AVAILABLE
        offset += size


class AllGatherCount:
    """The all-gather calls DeepSpeed issues from now on (its comm module is looked up at every call, so
    wrapping it counts them all): collective calls per step, deterministic where times are noisy. For
    benchmarks; the wrapping stays for the life of the process."""

    def __init__(self):
        from deepspeed import comm as dist
        self.calls = 0
        for name in ("all_gather_into_tensor", "allgather_fn"):
            setattr(dist, name, self._counting(getattr(dist, name)))

    def _counting(self, fn):
        def wrapper(*args, **kwargs):
            self.calls += 1
            return fn(*args, **kwargs)
        return wrapper


class GatheredPeak:
    """*Local.* The most bytes of partitioned base this rank holds gathered at once while `active`, sampled as
    each module with partitioned parameters computes: in forward once DeepSpeed has fetched them, in backward
    once the module's input gradient is ready and before DeepSpeed releases them. What ZeRO-3's gather windows
    let prefetch and reuse keep whole (persistent parameters, whole by design, are counted with the model
    states instead). Must be built after DeepSpeed has hooked the model, so these hooks run after its own."""

    def __init__(self, model):
        self.params = [p for p in model.parameters() if is_zero(p) and not getattr(p, "ds_persist", False)]
        watched = {id(p) for p in self.params}
        self.whole = sum(p.ds_numel * p.ds_tensor.element_size() for p in self.params)  # all of it gathered
        self.peak, self.active = 0, False
        for m in model.modules():  # inactive outside the watched steps: a flag test per module
            if any(id(p) in watched for p in m.parameters(recurse=False)):
                m.register_forward_pre_hook(self._before_forward)

    def sample(self, *unused) -> None:
        from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus
        held = sum(p.ds_numel * p.ds_tensor.element_size() for p in self.params  # in flight counts too
                   if p.ds_status != ZeroParamStatus.NOT_AVAILABLE)
        self.peak = max(self.peak, held)

    def _before_forward(self, module, inputs):
        if not self.active:
            return
        self.sample()
        # DeepSpeed's pre-forward hook has wrapped each input in the function that releases this module's
        # parameters after its backward: a hook on the wrapped input fires just before that release
        for x in inputs:
            if torch.is_tensor(x) and x.requires_grad:
                x.register_hook(self.sample)


def measure_model_states(engine, optimizer) -> dict:
    """*Local.* Bytes this rank holds at rest for parameters, gradients and optimizer state, read from
    DeepSpeed's own buffers: partitions, persistent copies (params DeepSpeed marked ds_persist, kept whole
    after first use; others a forward pass left gathered are transient), fp32 flats and their grads,
    grad partitions, IPG buckets."""
    model = engine.module
    inner, wrapper = torch_optimizer(optimizer), optimizer
    while not isinstance(wrapper, torch.optim.Optimizer) and not hasattr(wrapper, "fp32_partitioned_groups_flat") \
            and hasattr(wrapper, "optimizer"):
        wrapper = wrapper.optimizer
    frozen = [p for p in model.parameters() if not p.requires_grad]
    train = [p for p in model.parameters() if p.requires_grad]
    persistent = [p for p in frozen + train if is_zero(p) and getattr(p, "ds_persist", False) and p.data.numel()]
    lp = {t.untyped_storage().data_ptr() for p in train for t in [p.ds_tensor if is_zero(p) else p]}
    masters = [m for m in master_params(optimizer) if m.untyped_storage().data_ptr() not in lp]
    grads = [m.grad for m in master_params(optimizer)] + [p.grad for p in train if not is_zero(p)]
    grads.append(getattr(wrapper, "grad_partitions_flat_buffer", None))
    buckets = [b.buffer for b in getattr(wrapper, "ipg_buckets", {}).values() if getattr(b, "buffer", None) is not None]
    states = [t for st in inner.state.values() for t in st.values() if torch.is_tensor(t) and t.dim() > 0]
    out = {
        "base_partition": sum(local_bytes(p) for p in frozen),
        "persistent_copies": sum(p.data.numel() * p.data.element_size() for p in persistent),
        "trainable_working": sum(local_bytes(p) for p in train),
        "fp32_masters": _unique_bytes(masters),
        "gradients": _unique_bytes(grads),
        "optimizer_states": _unique_bytes(states),
        "reduce_bucket": _unique_bytes(buckets),
    }
    out["model_states"] = sum(out.values())
    return out
