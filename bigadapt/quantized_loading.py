"""Reading a safetensors base into a bitsandbytes 4-bit model under ZeRO-3 so that no rank ever holds the whole base.

transformers builds a quantized model outside zero.Init: under ZeRO-3 every rank reads every shard and holds the
whole 4-bit base until deepspeed.initialize partitions it. Here the model is built on the meta device with
transformers' own quantizer (`preprocess_model`: the same Linear4bit layers, the same skipped head and tied
weights), then each tensor is read from the shards whole, one at a time, and, for a 4-bit layer's weight,
quantized exactly as transformers' loader does (`Bnb4bitQuantize`: the value cast to the model dtype,
`Params4bit(value, **placeholder.__dict__).to(device)`: same quant type, blocksize, double quantization and
`bnb_4bit_quant_storage`); it is then turned into a ZeRO-3 parameter at once (`zero.Partitioner`), so this rank
keeps only its partition of the packed codes. The quant state (absmax per 64-element block, its nested
quantization, the code books) is an attribute of the parameter that ZeRO-3 does not partition: every rank keeps it
whole. Peak while loading: this rank's partitions so far + the quant states + one tensor (read, cast, quantized).
transformers' own tail (missing keys, tying, `postprocess_model`) runs after, as in loading.py.
"""
from __future__ import annotations

import torch
from torch import nn

from . import loading, zero


def fallback_reason(kwargs: dict) -> str | None:
    """Why this 4-bit load must go through transformers' from_pretrained (every rank then holds the whole base)."""
    qc = kwargs.get("quantization_config")
    if not getattr(qc, "load_in_4bit", False):
        return "not a 4-bit bitsandbytes config (int8 is quantized by transformers' path)"
    if qc.bnb_4bit_quant_storage != kwargs.get("dtype"):
        return "bnb_4bit_quant_storage differs from the model dtype (ZeRO-3 would cast the packed codes)"
    if kwargs.get("trust_remote_code") and getattr(kwargs["config"], "auto_map", None):
        return "remote code (trust_remote_code) defines the model class"
    unknown = set(kwargs) - {"config", "dtype", "trust_remote_code", "quantization_config"}
    return f"arguments this reader does not take: {sorted(unknown)}" if unknown else None


def load_sharded_4bit(auto, path: str, config, dtype: torch.dtype, quantization_config,
                      trust_remote_code: bool = False):
    """*Collective.* (model, loading info), or (None, reason) when transformers' path must be used."""
    from transformers.models.auto.auto_factory import _get_model_class
    ckpt = loading.find_checkpoint(path)
    if isinstance(ckpt, str):
        return None, ckpt
    cls = _get_model_class(config, auto._model_mapping)
    model, quantizer = _build_skeleton(cls, config, dtype, path, quantization_config)
    plan = loading._plan(model, ckpt, _stored_shape(model))
    if isinstance(plan, str):
        return None, plan
    info = _read(model, ckpt, plan, quantizer, dtype)
    _finish(cls, model, path, dtype, info, quantizer)
    return model, info.to_dict()


def _build_skeleton(cls, config, dtype: torch.dtype, path: str, quantization_config):
    """The model on the meta device with transformers' bitsandbytes layers in place (no weights anywhere)."""
    import copy

    from transformers.monkey_patching import patch_output_recorders
    from transformers.quantizers.auto import get_hf_quantizer
    from transformers.utils.generic import ContextManagers
    config = copy.deepcopy(config)
    quantizer, config, _ = get_hf_quantizer(config, quantization_config, None, True, {})
    config.name_or_path = path
    with zero.loading_paused():  # outside zero.Init, on meta: as transformers builds a quantized model
        with ContextManagers(cls.get_init_context(dtype, True, False, None)):
            model = cls(config)
            patch_output_recorders(model)
            quantizer.preprocess_model(model=model, dtype=dtype, device_map=_device_map(), checkpoint_files=[],
                                       use_kernels=False)
    return model, quantizer


def _stored_shape(model: nn.Module):
    """The checkpoint shape of each model tensor: a Linear4bit that replaced a GPT-2 Conv1D holds (out, in) where
    the checkpoint holds (in, out); transformers transposes it before quantizing (`_materialize` too)."""
    from transformers.pytorch_utils import Conv1D
    transposed = {id(m.weight) for m in model.modules()
                  if isinstance(getattr(m, "source_cls", None), type) and issubclass(m.source_cls, Conv1D)}

    def shape(t: torch.Tensor) -> tuple[int, ...]:
        return tuple(reversed(t.shape)) if id(t) in transposed else zero.full_shape(t)
    return shape


def _device_map() -> dict:
    """transformers' bitsandbytes default (the current accelerator, else the CPU), as DeepSpeed names it."""
    return {"": str(zero.load_device())}


def _read(model: nn.Module, ckpt: loading.Checkpoint, plan: loading.Plan, quantizer, dtype: torch.dtype):
    """*Collective.* File by file, tensor by tensor, in the same order on every rank: read whole, quantize if a
    4-bit weight, install in the model, partition at once."""
    from safetensors import safe_open
    from transformers.utils.loading_report import LoadStateDictInfo
    names = {id(t): n for n, t in model.state_dict(keep_vars=True).items()}
    partition = zero.Partitioner(dtype)
    for file, key in loading.read_order(ckpt, plan):
        name = names[id(plan.targets[key])]
        with safe_open(file, framework="pt") as f:  # per tensor: its mapped pages are dropped when closed
            value = _materialize(model, name, f.get_tensor(key), quantizer, dtype)
        if isinstance(value, nn.Parameter):
            partition(value)
    return LoadStateDictInfo(missing_keys=set(plan.missing), unexpected_keys=set(plan.unexpected),
                             mismatched_keys=set(), error_msgs=[], conversion_errors={}, skipped_pp_keys=set())


def _materialize(model: nn.Module, name: str, value: torch.Tensor, quantizer, dtype: torch.dtype) -> torch.Tensor:
    """Install the checkpoint's `value` as the model's `name`, as transformers' loader does: a 4-bit weight cast
    to the model dtype and quantized (`Bnb4bitQuantize.convert`), anything else cast to its placeholder's dtype."""
    import bitsandbytes as bnb
    from transformers.pytorch_utils import Conv1D
    owner, _, attr = name.rpartition(".")
    module = model.get_submodule(owner)
    old = getattr(module, attr)
    if quantizer.param_needs_quantization(model, name):
        value = value.to(device=zero.load_device(), dtype=dtype)  # quantized where transformers would: the device
        if issubclass(module.source_cls, Conv1D):  # GPT-2 stores (in, out): quantized as (out, in)
            value = value.T
        new = bnb.nn.Params4bit(value, requires_grad=False, **old.__dict__).to(value.device)
        module._is_hf_initialized = True
    elif attr in module._buffers:  # whole on every rank (ZeRO-3 partitions parameters only)
        new = value.to(device=zero.load_device(), dtype=old.dtype)
    else:
        new = nn.Parameter(value.to(old.dtype), requires_grad=value.is_floating_point())
    new._is_hf_initialized = True  # transformers' init then skips it
    setattr(module, attr, new)
    return new


def _finish(cls, model: nn.Module, path: str, dtype: torch.dtype, info, quantizer) -> None:
    """transformers' tail of from_pretrained for a quantized model (outside zero.Init, as it builds it): missing keys
    and non-persistent buffers off the meta device and initialised, weights tied, the quantizer's postprocess."""
    from transformers.modeling_utils import LoadStateDictConfig
    load_config = LoadStateDictConfig(pretrained_model_name_or_path=path, dtype=dtype, device_map=_device_map(),
                                      hf_quantizer=quantizer)
    with zero.loading_paused():
        cls._finalize_model_loading(model, load_config, info)
    model.eval()
    model.hf_quantizer = quantizer
    quantizer.postprocess_model(model)
    if model.can_generate():
        from transformers import GenerationConfig
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            pass


def holdings(model: nn.Module) -> dict[str, int]:
    """*Local.* Bytes this rank holds of a (possibly) 4-bit base, by kind: packed codes (its partition under ZeRO-3)
    against all of them, the quant states (whole on every rank), every other parameter held against whole, and the
    largest tensor a loader reads whole (a 4-bit weight before quantization: its logical shape in the base dtype)."""
    out = dict.fromkeys(("codes_bytes", "codes_whole", "state_bytes", "other_bytes", "other_whole", "largest_bytes"), 0)
    for p in model.parameters():
        state = getattr(p, "quant_state", None)
        whole = zero.full_numel(p) * (p.ds_tensor.element_size() if zero.is_zero(p) else p.element_size())
        if state is None:
            out["other_bytes"] += zero.local_bytes(p)
            out["other_whole"] += whole
            out["largest_bytes"] = max(out["largest_bytes"], whole)
            continue
        out["codes_bytes"] += zero.local_bytes(p)
        out["codes_whole"] += whole
        out["state_bytes"] += sum(_nbytes(t) for t in _state_tensors(state))
        out["largest_bytes"] = max(out["largest_bytes"], state.shape.numel() * state.dtype.itemsize)
    return out


def _state_tensors(state) -> list[torch.Tensor]:
    nested = [state.state2.absmax, state.state2.code] if state.nested else []
    return [t for t in [state.absmax, state.code, state.offset, *nested] if t is not None]


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()
