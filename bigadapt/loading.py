"""Reading a safetensors base under ZeRO-3 so that no rank ever holds all of it.

transformers' own `from_pretrained` under ZeRO-3 has rank 0 read every shard into one state dict and
broadcast it module by module: rank 0 maps the whole base while loading. Here the model is built under
zero.Init without initialising its weights (transformers' own init context), and then each rank reads from
the shards only the part of each tensor it owns (`safe_open(...).get_slice` on the rows that cover its range
of the flattened tensor), one tensor at a time, straight into `param.ds_tensor`. transformers' own tail
(initialising missing keys, tying weights, the load report) runs after, so the weights are the ones its
`from_pretrained` gives, bit for bit. Anything this reader does not handle falls back to transformers, with
one line saying why (`fallback_reason`).
"""
from __future__ import annotations

import copy
import json
import math
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from . import zero

INDEX, SINGLE = "model.safetensors.index.json", "model.safetensors"


@dataclass
class Checkpoint:
    """Where each tensor of a safetensors checkpoint lives: key -> file (one file, or a hub-style index)."""
    directory: str
    files: dict[str, str]


def find_checkpoint(path: str) -> Checkpoint | str:
    """The checkpoint's files, or why this reader cannot read it (a .bin checkpoint, nothing local)."""
    index, single = _resolve(path, INDEX), _resolve(path, SINGLE)
    if index:
        weight_map = json.loads(open(index).read())["weight_map"]
        folder = os.path.dirname(index)
        return Checkpoint(folder, {k: os.path.join(folder, f) for k, f in weight_map.items()})
    if single:
        from safetensors import safe_open
        with safe_open(single, framework="pt") as f:
            return Checkpoint(os.path.dirname(single), dict.fromkeys(f.keys(), single))
    return "no model.safetensors or model.safetensors.index.json (e.g. a .bin checkpoint)"


def _resolve(path: str, name: str) -> str | None:
    if os.path.isdir(path):
        return os.path.join(path, name) if os.path.isfile(os.path.join(path, name)) else None
    from transformers.utils import cached_file  # a hub id already in the local cache
    try:
        return cached_file(path, name, _raise_exceptions_for_missing_entries=False)
    except OSError:
        return None


def fallback_reason(kwargs: dict, config) -> str | None:
    """Why this load must go through transformers' from_pretrained, from the arguments alone (no model yet)."""
    from transformers.integrations import is_deepspeed_zero3_enabled
    if not is_deepspeed_zero3_enabled():
        return "not under ZeRO-3"  # whole on every rank by design: nothing to shard while reading
    if kwargs.get("quantization_config") is not None or getattr(config, "quantization_config", None):
        return "a quantized base (bitsandbytes builds it outside zero.Init)"
    if kwargs.get("trust_remote_code") and getattr(config, "auto_map", None):
        return "remote code (trust_remote_code) defines the model class"
    if kwargs.get("dtype") is None:
        return "no dtype given (transformers picks one from the checkpoint)"
    unknown = set(kwargs) - {"config", "dtype", "trust_remote_code"}
    return f"arguments this reader does not take: {sorted(unknown)}" if unknown else None


def load_sharded(auto, path: str, config, dtype: torch.dtype, trust_remote_code: bool = False):
    """Build under zero.Init and read each rank's partitions from the shards. Returns (model, loading info as
    transformers' `output_loading_info` gives it), or (None, reason) when transformers' path must be used."""
    ckpt = find_checkpoint(path)
    if isinstance(ckpt, str):
        return None, ckpt
    from transformers.models.auto.auto_factory import _get_model_class
    cls = _get_model_class(config, auto._model_mapping)
    model = _build_empty(cls, config, dtype, path)
    plan = _plan(model, ckpt)
    if isinstance(plan, str):
        del model
        return None, plan
    info = _read(model, ckpt, plan)
    _finish(cls, model, path, dtype, info)
    return model, info.to_dict()


def _build_empty(cls, config, dtype: torch.dtype, path: str) -> nn.Module:
    """The model under zero.Init with no weight init (its values come from the files), as from_pretrained does."""
    from transformers.monkey_patching import patch_output_recorders
    from transformers.utils.generic import ContextManagers
    config = copy.deepcopy(config)
    config.name_or_path = path
    with ContextManagers(cls.get_init_context(dtype, False, False, None)):
        model = cls(config)
        patch_output_recorders(model)
    return model


@dataclass
class Plan:
    """Checkpoint key -> the model's tensor it fills; keys the model lacks; model keys the checkpoint lacks."""
    targets: dict[str, torch.Tensor]
    unexpected: set[str]
    missing: set[str]


def _plan(model: nn.Module, ckpt: Checkpoint, stored_shape=zero.full_shape) -> Plan | str:
    """Match checkpoint keys to the model's, adding the base-model prefix the way transformers' ZeRO-3 loader does
    (a base saved from BertModel read into BertForSequenceClassification). Renames and shape changes: fall back.
    `stored_shape(tensor)`: the shape the checkpoint must hold for a model tensor (quantized_loading: transposed)."""
    from transformers.modeling_utils import get_model_conversion_mapping
    own = model.state_dict(keep_vars=True)
    prefix = getattr(model, "base_model_prefix", "")
    renames = [re.compile(s) for c in get_model_conversion_mapping(model, None, None) for s in c.source_patterns]
    targets, unexpected = {}, set()
    for key in ckpt.files:
        if any(r.search(key) for r in renames):
            return f"checkpoint key {key!r} is renamed by {type(model).__name__}'s conversion mapping"
        name = f"{prefix}.{key}" if prefix and f"{prefix}.{key}" in own else key
        if name not in own:
            unexpected.add(key)
            continue
        targets[key] = own[name]
    bad = _shape_mismatch(targets, ckpt, stored_shape)
    if bad:
        return bad
    loaded = {id(t) for t in targets.values()}
    return Plan(targets, unexpected, {n for n, t in own.items() if id(t) not in loaded})


def _shape_mismatch(targets: dict, ckpt: Checkpoint, stored_shape) -> str | None:
    from safetensors import safe_open
    for file in sorted(set(ckpt.files.values())):
        with safe_open(file, framework="pt") as f:
            for key in f.keys():
                if key in targets and tuple(f.get_slice(key).get_shape()) != stored_shape(targets[key]):
                    return f"{key}: shape {tuple(f.get_slice(key).get_shape())} in the checkpoint, " \
                           f"{stored_shape(targets[key])} in the model"
    return None


def read_order(ckpt: Checkpoint, plan: Plan) -> list[tuple[str, str]]:
    """(file, key) of every planned tensor, file by file and sorted within each: the same order on every rank,
    which the collective conversions need."""
    by_file: dict[str, list[str]] = {}
    for key, file in ckpt.files.items():
        if key in plan.targets:
            by_file.setdefault(file, []).append(key)
    return [(file, key) for file in sorted(by_file) for key in sorted(by_file[file])]


def _read(model: nn.Module, ckpt: Checkpoint, plan: Plan):
    """*Collective* only for tensors without a local partition to write (see write_partition). File by file,
    tensor by tensor, in the same order on every rank."""
    from safetensors import safe_open
    from transformers.utils.loading_report import LoadStateDictInfo
    for file, key in read_order(ckpt, plan):
        # opened per tensor: the file's pages this rank touched are mapped, so resident, until it is closed
        with safe_open(file, framework="pt") as f:
            write_partition(plan.targets[key], f.get_slice(key))
            plan.targets[key]._is_hf_initialized = True  # transformers' init then skips it
    return LoadStateDictInfo(missing_keys=set(plan.missing), unexpected_keys=set(plan.unexpected),
                             mismatched_keys=set(), error_msgs=[], conversion_errors={}, skipped_pp_keys=set())


def write_partition(t: torch.Tensor, stored) -> None:
    """Copy into t the part this rank owns of a stored tensor (a safetensors slice), cast to t's dtype.

    ZeRO-3 gives rank r the elements [r * size, (r + 1) * size) of the *flattened* tensor, zero-padded at the
    end: read only the rows that cover that range, cut it out. A buffer, or a parameter whose partition is
    not a plain local tensor (NVMe offload, hierarchical partitioning), is read whole and written whole."""
    part = zero.local_partition(t)
    if part is None:
        with torch.no_grad():
            value = stored[:] if stored.get_shape() else stored[...]
            if zero.is_zero(t):
                zero.set_param(t, value)
            else:
                t.copy_(value.reshape(t.shape))
        return
    start, flat = part
    numel = zero.full_numel(t)
    end = min(start + flat.numel(), numel)
    with torch.no_grad():
        if end > start:
            flat[:end - start].copy_(_covering(stored, start, end))
        flat[max(end - start, 0):].zero_()  # padding, as DeepSpeed leaves it after partitioning


def _covering(stored, start: int, end: int) -> torch.Tensor:
    """Flat elements [start, end) of a stored tensor, reading only the leading-dimension rows that hold them."""
    shape = stored.get_shape()
    if not shape:
        return stored[...].reshape(-1)[start:end]
    row = math.prod(shape[1:])
    first, last = start // row, -(-end // row)
    rows = stored[first:last].reshape(-1)
    return rows[start - first * row:end - first * row]


def _finish(cls, model: nn.Module, path: str, dtype: torch.dtype, info) -> None:
    """transformers' own tail of from_pretrained: init what is missing, tie weights, adjust the report."""
    from transformers.modeling_utils import LoadStateDictConfig
    cls._finalize_model_loading(model, LoadStateDictConfig(pretrained_model_name_or_path=path, dtype=dtype), info)
    model.eval()  # what from_pretrained returns
    if model.can_generate():
        from transformers import GenerationConfig
        try:
            model.generation_config = GenerationConfig.from_pretrained(path)
        except OSError:
            pass  # no generation_config.json: the one built from the model config stays
