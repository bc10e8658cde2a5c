"""The accounting of a bitsandbytes-quantized frozen base (method qlora): what bitsandbytes keeps per weight, and
the base's per-rank bytes. Part of the memory accounting (accounting.py), split out as its own concept."""
from __future__ import annotations

import dataclasses
import functools
import json
import math

from .model import build_meta


def quantized_bytes(numel: int, quantization: str, rows: int) -> tuple[int, int]:
    """(packed codes, quant state) bytes bitsandbytes keeps for one weight of `numel` elements, `rows` outputs.

    nf4/fp4 with double quantization (what model.bnb_config asks for): two codes per byte; per 64-element
    block an absmax quantized to one byte; per 256 blocks an fp32 absmax of those; a 16-entry fp32 code
    book, the 256-entry fp32 nested code book and an fp32 offset. int8: one byte per element and an fp32
    scale per output row. The codes are the parameter ZeRO-3 partitions; the state rides on it, whole.
    """
    if quantization == "int8":
        return numel, 4 * rows
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2), blocks + 4 * math.ceil(blocks / 256) + 4 * (16 + 256 + 1)


def base_bytes(ts, cfg, world: int, dtype_bytes: int) -> int:
    """Per-rank bytes of the frozen base when model.quantization is set: quantized layers by
    `quantized_bytes` (codes split over `world`), everything else (embeddings, norms, head) in the base dtype."""
    total = 0
    for n, rows in _frozen(ts, cfg):
        if rows:
            codes, state = quantized_bytes(n, cfg.model.quantization, rows)
            total += math.ceil(codes / world) + state
        else:
            total += math.ceil(n / world) * dtype_bytes
    return total


def _frozen(ts, cfg):
    """(numel, output rows if bitsandbytes quantizes it else 0) of every frozen base tensor."""
    rows = _quantized_rows(json.dumps(dataclasses.asdict(cfg.model), sort_keys=True))
    for name, n, t, _ in ts:
        if not t:
            module = name.replace(".base_layer", "").removesuffix(".weight")
            yield n, (rows.get(module, 0) if name.endswith(".weight") else 0)


@functools.lru_cache(maxsize=8)
def _quantized_rows(model_json: str) -> dict[str, int]:
    """{module name: output rows} of the layers bitsandbytes quantizes (one meta build per model config)."""
    from .config import ModelConfig
    from .model import quantized_modules
    model = build_meta(ModelConfig(**json.loads(model_json)))
    out = {}
    for name in quantized_modules(model):
        m = model.get_submodule(name)
        out[name] = getattr(m, "out_features", None) or m.nf  # nn.Linear, or GPT-2 Conv1D
    return out


def load_peak(ts, cfg, world: int, stage: int, dtype_bytes: int) -> dict:
    """Per-rank bytes while a quantized base loads, as the trainer loads it (model.from_pretrained), beside the
    whole quantized base. Under ZeRO-3 with a 4-bit base (quantized_loading): the rank's partition
    (`base_bytes`) + one tensor at a time read whole in the base dtype and, for a 4-bit weight, its packed codes
    whole until partitioned (the checkpoint assumed stored in the base dtype; another dtype adds one cast copy).
    int8, or no ZeRO-3: transformers' path, every rank holds the whole quantized base. A base built from a config
    (model.arch, no weights) is first built whole in full precision: not modelled here (tests and tiny runs)."""
    whole = base_bytes(ts, cfg, 1, dtype_bytes)
    if stage < 3 or cfg.model.quantization == "int8":
        return {"path": "transformers (every rank holds the whole quantized base)", "peak": whole, "whole": whole}
    # a 4-bit weight: read in the base dtype, and its packed codes whole until partitioned
    largest = max((n * dtype_bytes + (math.ceil(n / 2) if rows else 0) for n, rows in _frozen(ts, cfg)), default=0)
    return {"path": "streamed (each rank keeps its partition of the 4-bit codes, quant states whole)",
            "peak": base_bytes(ts, cfg, world, dtype_bytes) + largest, "whole": whole, "largest_tensor": largest}
