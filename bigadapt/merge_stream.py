"""`bigadapt merge` over the base's safetensors files, one tensor at a time: the whole model is never in memory.

The model exists only as a skeleton on the meta device (names, shapes, dtypes) with the method injected into it
and the trained tensors loaded; every base tensor is read from its shard, folded by the method's own wrapper
(`LoRA.merge`, `DoRA.merge`, `SliceBias.merge`: the very code the in-memory merge runs, so the result is the same
bit for bit; DoRA's magnitude is one of the trained tensors loaded into the skeleton),
written, and dropped. Output shards keep the base's file names and layout; the task head (and any module the
base lacked) goes into the last one. Peak memory: the adapter, the skeleton's trained tensors and about three
copies of the largest tensor (read, its fp32 delta, the sum), whatever the shard size.

Streaming applies where the weights are local safetensors (a directory, or a hub snapshot already in the cache),
the file names are the model's own (or differ by the base-model prefix), and the method merges tensor by tensor
(`STREAMED`). Anything else says why in one line and `export.merged` builds the model in memory as before.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from pathlib import Path

import torch
from torch import nn

from . import checkpoint, methods, targets
from . import fingerprint as fp
from . import model as base_model
from .errors import BigadaptError
from .methods import lora_init

# methods whose module-level merge is exactly "each wrapper's merge" plus trained base tensors kept as trained
STREAMED = ("lora", "bitfit", "full", "ft_top_k")
INDEX = "model.safetensors.index.json"
ST_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16", torch.float64: "F64",
             torch.int64: "I64", torch.int32: "I32", torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8",
             torch.bool: "BOOL"}


@dataclasses.dataclass
class Source:
    """The base's weights: its directory, {file tensor name: shard file}, shard files in order."""
    root: Path
    weight_map: dict[str, str]
    indexed: bool

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


def find_source(mcfg) -> tuple[Source | None, str]:
    """(the base's safetensors, "") or (None, why the merge must build the model in memory)."""
    if not mcfg.name_or_path:
        return None, "the base was built from model.arch (no files to stream)"
    if mcfg.quantization != "none":
        return None, "the base is quantized"
    root = _local_dir(mcfg.name_or_path)
    if root is None:
        return None, f"{mcfg.name_or_path} is neither a local directory nor a hub snapshot in the cache"
    if (root / INDEX).is_file():
        return Source(root, json.loads((root / INDEX).read_text())["weight_map"], True), ""
    if (root / "model.safetensors").is_file():
        from safetensors import safe_open
        with safe_open(root / "model.safetensors", "pt") as f:
            return Source(root, {k: "model.safetensors" for k in f.keys()}, False), ""
    return None, f"{root} holds no safetensors weights"


def _local_dir(name: str) -> Path | None:
    if Path(name).is_dir():
        return Path(name)
    try:  # a hub id: the snapshot transformers would load, if its config is cached (never a download here)
        from huggingface_hub import try_to_load_from_cache
        hit = try_to_load_from_cache(name, "config.json")
    except Exception:  # an id huggingface_hub rejects is simply not a cached snapshot
        return None
    return Path(hit).parent if isinstance(hit, str) else None


# ---------------------------------------------------------------- the plan (reads headers only)
@dataclasses.dataclass
class Plan:
    skeleton: nn.Module           # meta base, method injected, trained tensors loaded (real, on the CPU)
    file_of: dict[str, str]       # output (model) tensor name -> its name in the base files
    out_names: list[str]          # what save_pretrained would write, in model order
    base_fp: dict


def plan(src: Source, ckpt: Path, manifest: dict, cfg) -> tuple[Plan | None, str]:
    """Everything checked before a byte is written (after `refuse_unmergeable`): the file names map onto the
    model, the fingerprint is the run's base, the adapter holds the trainable set. (None, why) where the merge
    must build the model in memory instead."""
    if manifest["base"].get("version", 1) < 2:
        return None, "the checkpoint's base fingerprint is version 1 (verified by the in-memory path only)"
    if cfg.method.name not in STREAMED:
        return None, f"method {cfg.method.name!r} is not known to merge tensor by tensor"
    skeleton = _skeleton(cfg.model)
    out_names = _saved_names(skeleton)
    file_of = _name_map(src, skeleton, out_names)
    missing = [n for n in out_names if n not in file_of]
    skeleton.bigadapt_new_modules = base_model.new_modules(skeleton, missing)  # as from_pretrained's report does
    heads = targets.head_prefixes(skeleton)
    unplaced = [n for n in missing if not _under(n, heads)]
    if unplaced:
        return None, f"the base files lack {unplaced[0]} (names the streaming merge cannot map)"
    base_fp = _fingerprint(src, skeleton, heads, file_of)
    fp.check_fingerprint(manifest["base"], base_fp, ckpt)
    _materialise_heads(skeleton, heads, cfg.train.seed)
    methods.apply_seeded(skeleton, cfg)
    checkpoint.check_names(manifest, skeleton, ckpt)
    _load_trained(skeleton, checkpoint.read_tensors(ckpt, "adapter.safetensors"))
    return Plan(skeleton, file_of, out_names, base_fp), ""


def refuse_unmergeable(cfg) -> None:
    """A method whose merge refuses refuses here, before anything is read: with the message it gives on the
    model itself (adapters name their variant), from a skeleton that holds no weights."""
    merge = methods.get(cfg.method.name).merge
    try:
        merge(nn.Module())
    except BigadaptError as refusal:
        try:
            skeleton = _skeleton(cfg.model)
            methods.apply_seeded(skeleton, cfg)
        except Exception:  # a method that cannot be injected on the meta device: its generic message will do
            raise refusal from None
        merge(skeleton)
        raise


def _skeleton(mcfg) -> nn.Module:
    """The base as from_pretrained builds it (same config overrides, class and dtypes), on the meta device."""
    config = base_model.hf_config(mcfg)
    with torch.device("meta"):
        model = base_model._auto_class(mcfg.objective).from_config(
            config, dtype=base_model.DTYPES[mcfg.dtype], trust_remote_code=mcfg.trust_remote_code)
    return model


def _saved_names(model: nn.Module) -> list[str]:
    """save_pretrained's tensors: parameters once each (a tied lm_head is its embedding), persistent buffers."""
    names = [n for n, _ in model.named_parameters()]
    for mname, module in model.named_modules():
        for bname, buf in module.named_buffers(recurse=False):
            if buf is not None and bname not in module._non_persistent_buffers_set:
                names.append(f"{mname}.{bname}" if mname else bname)
    return names


def _name_map(src: Source, model: nn.Module, names: list[str]) -> dict[str, str]:
    """model name -> file name: the same, or differing by the base-model prefix (a base saved from the bare
    model and loaded with a head, or the reverse); the reading that finds the most names wins."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    readings = [lambda n: n]
    if prefix:
        readings += [lambda n: n.removeprefix(prefix + "."), lambda n: f"{prefix}.{n}"]
    best = max(([(n, r(n)) for n in names if r(n) in src.weight_map] for r in readings), key=len)
    return dict(best)


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name.startswith(p + ".") for p in prefixes)


def _fingerprint(src: Source, skeleton: nn.Module, heads: list[str], file_of: dict[str, str]) -> dict:
    """fingerprint.fingerprint of the base from_pretrained would build, read from the files: the same layout
    string and the same sampled elements (rows holding them only), at the dtype the model holds them in."""
    params = fp.base_params(skeleton, heads)
    reader = _Reader(src)
    parts = [_sample(reader, file_of[n], p, fp.positions(n, p.numel())) for n, p in params]
    sample = torch.cat(parts) + 0.0 if parts else torch.zeros(0, dtype=torch.float64)
    return fp.record(skeleton, [(n, list(p.shape), fp.dtype_name(p)) for n, p in params], sample)


def _sample(reader: _Reader, name: str, p: torch.Tensor, where: list[int]) -> torch.Tensor:
    if p.dim() != 2:  # vectors (and the rare 3-d tensor) are read whole
        return reader.get(name).to(p.dtype).reshape(-1)[where].double()
    cols = p.shape[1]
    rows = reader.rows(name, [i // cols for i in where])
    return torch.stack([rows[i // cols][i % cols] for i in where]).to(p.dtype).double()


def generation_config(src: Source, skeleton: nn.Module):
    """What from_pretrained attaches: the base's generation_config.json where it has one, else the model's."""
    from transformers import GenerationConfig
    own = getattr(skeleton, "generation_config", None)  # generative classes only
    if own is not None and (src.root / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(src.root)
    return own


def _materialise_heads(skeleton: nn.Module, heads: list[str], seed: int) -> None:
    """The head as build_base makes it (drawn from the run's seed per name); a trained head overwrites it."""
    for h in heads:
        skeleton.get_submodule(h).to_empty(device="cpu")
    base_model.random_init(skeleton, seed, heads)


def _load_trained(skeleton: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """checkpoint.load_adapter's copy (cast to the parameter's dtype); a meta parameter (a base tensor trained in
    place, a meta-built SliceBias) becomes a real one."""
    with torch.no_grad():
        for name, p in list(skeleton.named_parameters()):
            if name not in tensors:
                continue
            if p.is_meta:
                owner, _, attr = name.rpartition(".")
                setattr(skeleton.get_submodule(owner), attr, nn.Parameter(tensors[name].to(p.dtype), False))
            else:
                p.copy_(tensors[name].to(p.dtype))


# ---------------------------------------------------------------- reading and folding
class _Reader:
    """Tensors by their file name. Each read opens and closes its shard: safe_open maps the file, and the pages a
    read faults in (with the kernel's readahead around them) count as this process's memory while the map lives,
    so a shard held open through a pass would grow to the whole shard."""

    def __init__(self, src: Source):
        self.src = src

    def get(self, name: str) -> torch.Tensor:
        from safetensors import safe_open
        with safe_open(self.src.root / self.src.weight_map[name], "pt") as f:
            return f.get_tensor(name)

    def rows(self, name: str, rows: list[int]) -> dict[int, torch.Tensor]:
        from safetensors import safe_open
        with safe_open(self.src.root / self.src.weight_map[name], "pt") as f:
            view = f.get_slice(name)
            return {r: view[r:r + 1][0].clone() for r in sorted(set(rows))}


class _Folder:
    """The merged value of each output tensor: the skeleton's own (head, trained in place), or the file's, cast
    to the model's dtype and folded by its wrapper's merge when it belongs to a wrapped layer."""

    def __init__(self, plan: Plan, reader: _Reader):
        self.plan, self.reader, self.done = plan, reader, {}
        self.params = {n.replace(".base_layer", ""): p for n, p in plan.skeleton.named_parameters()}
        self.params.update({n: b for n, b in plan.skeleton.named_buffers()})
        self.wrappers = {n: m for n, m in plan.skeleton.named_modules() if hasattr(m, "base_layer")}

    def value(self, name: str) -> torch.Tensor:
        own = self.params[name]
        if not own.is_meta:
            return own.detach()
        if name in self.done:  # the other tensor of a layer folded for its first one
            return self.done.pop(name)
        owner = name.rpartition(".")[0]
        if owner in self.wrappers:
            return self._fold(owner, name)
        return self.reader.get(self.plan.file_of[name]).to(own.dtype)

    def _fold(self, owner: str, name: str) -> torch.Tensor:
        """The wrapper's own merge on its base layer made real for the moment (every direct tensor of it: a
        merge may touch weight or bias), then the layer is meta again."""
        wrapper = self.wrappers[owner]
        layer = wrapper.base_layer
        metas = [(k, p) for k, p in layer.named_parameters(recurse=False) if p.is_meta]
        for k, p in metas:
            real = self.reader.get(self.plan.file_of[f"{owner}.{k}"]).to(p.dtype)
            setattr(layer, k, nn.Parameter(real, requires_grad=False))
        lora_init.rebuild_residual(wrapper)  # PiSSA/OLoRA trained on W0's residual: rebuild it before the merge
        wrapper.merge(1.0)
        folded = {f"{owner}.{k}": getattr(layer, k).detach() for k, _ in metas}
        for k, p in metas:
            setattr(layer, k, p)
        wrapper.merged = False
        mine = folded.pop(name)
        self.done.update({k: v for k, v in folded.items() if k in self.plan.file_of})
        return mine


# ---------------------------------------------------------------- writing
def write(plan: Plan, src: Source, out: Path) -> int:
    """Every output shard, then the index where the base had one; returns the bytes of weights written."""
    reader = _Reader(src)
    folder = _Folder(plan, reader)
    shards = {f: [] for f in src.files()}
    for n in plan.out_names:
        shards[src.weight_map[plan.file_of[n]] if n in plan.file_of else src.files()[-1]].append(n)
    weight_map, total = {}, 0
    for fname, names in shards.items():
        if names:
            entries = [(n, list(folder.params[n].shape), folder.params[n].dtype) for n in names]
            total += write_safetensors(out / fname, entries, folder.value)
            weight_map.update({n: fname for n in names})
    if src.indexed or len(shards) > 1:
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (out / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return total


def write_safetensors(path: Path, entries: list[tuple[str, list[int], torch.dtype]], value) -> int:
    """A safetensors file written tensor by tensor: the header is known from shapes and dtypes, so no tensor
    waits for another (safetensors' own save_file serialises the whole dict in memory). Returns data bytes."""
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in entries:
        size = math.prod(shape) * torch.empty(0, dtype=dtype).element_size()
        header[name] = {"dtype": ST_DTYPES[dtype], "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)  # the format's alignment: tensor data starts on an 8-byte boundary
    tmp = path.with_name(path.name + ".partial")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)) + blob)
        for name, shape, dtype in entries:
            t = value(name)
            if list(t.shape) != shape or t.dtype != dtype:
                raise BigadaptError(f"{name}: merged to {list(t.shape)} {t.dtype}, expected {shape} {dtype}")
            f.write(t.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    os.replace(tmp, path)
    return offset
