"""Where DeepSpeed keeps a trainable parameter's fp32 master, Adam moments and loss scale, at every ZeRO stage and
precision: read and written as whole tensors for checkpoints, init_from and head init. Part of `bigadapt.zero`:
import it from there."""
from __future__ import annotations

import torch

from .params import all_reduce_max_list, full_shape, gathered, is_zero


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
