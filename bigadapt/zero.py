"""Every ZeRO-3 detail in one place.

Under ZeRO-3 a parameter's `.data` is an empty placeholder: its true shape is `ds_shape`, this rank's
slice is `ds_tensor`, and the fp32 master and Adam moments live in the optimizer's flat partitions.
Everything else in bigadapt asks this module, so the rest of the code reads as if parameters were whole.
Functions marked *collective* must be called by every rank in the same order.
"""
from __future__ import annotations

import contextlib
import math

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


def _hp_managed(p: torch.Tensor) -> bool:
    # ZeRO-3 params, or ZeRO-1/2 / bf16-optimizer params whose fp32 master lives in the optimizer
    return is_zero(p) or hasattr(p, "_hp_mapping")


def link_fp32_copies(opt) -> None:
    """bf16/fp16 without ZeRO (stage 0): DeepSpeed's FP16_UnfusedOptimizer clones each trainable parameter into an
    fp32 copy (`fp32_groups`, parallel to `fp16_groups`) that torch's AdamW steps and keys its state by; the
    parameter itself is only the 16-bit working copy, overwritten from its copy after every step. Tag each
    parameter with its copy, as DeepSpeed tags ZeRO's with `_hp_mapping`, so that code holding only the parameter
    (init_from, a regression head's bias) reaches its master too. No-op for every other optimizer."""
    w = opt
    while w is not None and not isinstance(w, torch.optim.Optimizer):
        for lows, highs in zip(getattr(w, "fp16_groups", ()), getattr(w, "fp32_groups", ())):
            for low, high in zip(lows, highs):
                low._bigadapt_fp32 = high
        w = getattr(w, "optimizer", None)


def _own_master(p: torch.Tensor) -> torch.Tensor:
    """For a parameter DeepSpeed does not map: the tensor the torch optimizer steps (its fp32 copy, or itself)."""
    copy = getattr(p, "_bigadapt_fp32", None)
    return p if copy is None else copy


def full_master(p: torch.Tensor) -> torch.Tensor:
    """*Collective.* The full fp32 master of a trainable parameter, on CPU, at its true shape."""
    from deepspeed.utils import safe_get_full_fp32_param
    v = safe_get_full_fp32_param(p) if _hp_managed(p) else _own_master(p).detach()
    return v.detach().float().cpu().reshape(full_shape(p)).clone()


def set_master(p: torch.Tensor, value: torch.Tensor) -> None:
    """*Collective.* Set the fp32 master and the working copy (which DeepSpeed would not refresh itself)."""
    from deepspeed.utils import safe_set_full_fp32_param
    if _hp_managed(p):
        safe_set_full_fp32_param(p, value.float().to(_device(p)).reshape(-1))
    elif _own_master(p) is not p:
        with torch.no_grad():
            _own_master(p).copy_(value.float().reshape(p.shape))
    set_param(p, value)


def set_param(p: torch.Tensor, value: torch.Tensor) -> None:
    """*Collective.* Write the whole value of a parameter, partitioned or not, without touching any optimizer
    state (inference: a trained adapter loaded into a sharded model that has no optimizer)."""
    with torch.no_grad(), gathered([p], modify=True) as writer:
        if writer:
            p.data.copy_(value.to(p.dtype).reshape(p.data.shape))


def _device(p: torch.Tensor) -> torch.device:
    return p.ds_tensor.device if is_zero(p) else p.device


def torch_optimizer(opt):
    """The torch optimizer under DeepSpeed's wrappers (its state is keyed by DeepSpeed's flat partitions)."""
    while not isinstance(opt, torch.optim.Optimizer) and hasattr(opt, "optimizer"):
        opt = opt.optimizer
    return opt


def master_params(opt) -> list[torch.Tensor]:
    """The fp32 tensors the torch optimizer steps, i.e. the keys of its state.

    ZeRO-3 keeps its flat fp32 partitions out of param_groups between steps (it swaps them in per
    sub-group inside step()), so they are read from the wrapper; elsewhere param_groups hold them.
    """
    wrapper = opt
    while not isinstance(wrapper, torch.optim.Optimizer):
        if hasattr(wrapper, "fp32_partitioned_groups_flat"):
            return list(wrapper.fp32_partitioned_groups_flat)
        if not hasattr(wrapper, "optimizer"):
            break
        wrapper = wrapper.optimizer
    return [p for g in torch_optimizer(opt).param_groups for p in g["params"]]


def full_optimizer_state(opt, p: torch.Tensor, key: str) -> torch.Tensor:
    """*Collective.* An Adam moment of p at p's true shape, fp32, on CPU."""
    from deepspeed.utils import safe_get_full_optimizer_state
    v = safe_get_full_optimizer_state(p, key) if _hp_managed(p) else torch_optimizer(opt).state[_own_master(p)][key]
    return v.detach().float().cpu().reshape(full_shape(p)).clone()


def set_optimizer_state(opt, p: torch.Tensor, key: str, value: torch.Tensor) -> None:
    """*Collective.*"""
    from deepspeed.utils import safe_set_full_optimizer_state
    if _hp_managed(p):
        safe_set_full_optimizer_state(p, value.float().to(_device(p)).reshape(-1), key)
    else:
        torch_optimizer(opt).state[_own_master(p)][key].copy_(value.reshape(p.shape))


def ensure_adam_state(opt, step: int) -> None:
    """Create Adam state before the first step (torch creates it lazily) so a resume can fill it in; and link
    16-bit parameters to their fp32 copies (link_fp32_copies), as engine.initialize calls this first."""
    link_fp32_copies(opt)
    inner = torch_optimizer(opt)
    # fused/capturable AdamW keeps `step` on the parameter's device, the others on the CPU
    on_device = inner.defaults.get("fused") or inner.defaults.get("capturable")
    for p in master_params(opt):
        st = inner.state[p]
        if not st:
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        if torch.is_tensor(st.get("step")):
            st["step"].fill_(float(step))  # in place: views DeepSpeed linked to the state stay valid
        else:
            st["step"] = torch.tensor(float(step), device=p.device if on_device else "cpu")
    _link_optimizer_state(opt)


def _link_optimizer_state(opt) -> None:
    """ZeRO-1/2 and the bf16 optimizer map a parameter to its slice of Adam's state only in their first step()
    (`_lazy_init_hp_params_optimizer_state`); a resume sets the moments before any step, through that mapping."""
    w = opt
    while w is not None and not isinstance(w, torch.optim.Optimizer):
        if hasattr(w, "_lazy_init_hp_params_optimizer_state"):
            w._lazy_init_hp_params_optimizer_state()
        w = getattr(w, "optimizer", None)


def optimizer_step(opt) -> int:
    """*Collective.* The steps Adam has applied: fewer than the run's steps when DeepSpeed skipped some (fp16
    overflow), and what its bias correction depends on, so a resume must restore this count, not the run's."""
    steps = [float(st["step"]) for st in torch_optimizer(opt).state.values() if "step" in st]
    return int(all_reduce_max_list([max(steps, default=0.0)])[0])


# The dynamic loss scaler's state (fp16): where the scale search stands. Without it a resumed fp16 run would
# restart the search at 2^16 and skip other steps than the uninterrupted run.
SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def _loss_scaler(opt):
    # ZeRO's optimizers keep a LossScaler in `loss_scaler`; the stage-0 fp16/bf16 wrappers a `loss_scale_config`
    w = opt
    while w is not None and not isinstance(w, torch.optim.Optimizer):
        for attr in ("loss_scaler", "loss_scale_config"):
            if getattr(w, attr, None) is not None:
                return getattr(w, attr)
        w = getattr(w, "optimizer", None)
    return None


def loss_scale_state(opt) -> dict:
    """The loss scaler's numbers (the same on every rank), JSON-ready; {} without mixed precision."""
    scaler, out = _loss_scaler(opt), {}
    for field in SCALER_FIELDS if scaler is not None else ():
        value = getattr(scaler, field, None)
        if torch.is_tensor(value):
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[field] = value
    return out


def set_loss_scale_state(opt, state: dict) -> None:
    scaler = _loss_scaler(opt)
    for field, value in state.items() if scaler is not None else ():
        if field in SCALER_FIELDS and hasattr(scaler, field):
            current = getattr(scaler, field)
            setattr(scaler, field, torch.tensor(value, dtype=current.dtype, device=current.device)
                    if torch.is_tensor(current) else type(current)(value) if current is not None else value)


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


def coalesce_persistent_gather(optimizer) -> None:
    """DeepSpeed re-partitions every parameter as each optimizer step begins and, after it, re-gathers the
    persistent ones (below param_persistence_threshold: norms, biases, a LoRA's A and B) with a collective
    call per tensor: ~8 per block per step. This gathers them after each step in one call per dtype instead,
    into a buffer holding only them. Same values; `bigadapt bench peft` counts the calls (98 -> 36 per step
    on its 6-block GPT-2)."""
    persistent = getattr(optimizer, "persistent_parameters", None)  # the list DeepSpeed's _post_step gathers
    if not persistent or not hasattr(optimizer, "_post_step"):  # another DeepSpeed: leave it its own way
        return
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
