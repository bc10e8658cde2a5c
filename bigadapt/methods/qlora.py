"""QLoRA (Dettmers et al. 2023): LoRA on a frozen base whose Linear layers bitsandbytes stores in 4 bits
(NF4 or FP4, double-quantized absmax) or 8 bits (LLM.int8 with per-row scales).

The base is quantized while it is loaded (`model.build_base` with `model.quantization`); the output head, tied
weights and embeddings stay in the base dtype. The LoRA itself is bigadapt's LoRA unchanged: bitsandbytes'
`Linear4bit` and `Linear8bitLt` are `nn.Linear` subclasses carrying the logical in/out features, so
`lora.inject` wraps them like any Linear (GPT-2's Conv1D becomes a transposed Linear4bit when quantized,
so a fused c_attn is sliced the same way). A and B are created in fp32 and take the compute dtype under
DeepSpeed mixed precision, as LoRA's do; only they (and a fresh task head) are trained and saved.

ZeRO: runs with every stage (tested 0 in one process, 2 and 3 on 2 CPU ranks; ZeRO-3 losses equal the
one-process run's). Under ZeRO-3 a 4-bit base is quantized tensor by tensor and partitioned as it is read
(quantized_loading.py): no rank holds the whole quantized base; int8 goes through transformers' path, where
each rank does until deepspeed.initialize partitions it (one line at start says so).

What it refuses, each as one line before any process group:
  * qlora without model.quantization, a quantized base with another method, an fp16 base;
  * merging: the update cannot be added into packed 4-bit codes without requantizing, which would change
    the frozen base (and its fingerprint) by more than the update itself at small scale.
"""
from __future__ import annotations

from torch import nn

from ..errors import BigadaptError, ConfigError
from . import lora


def validate(mcfg) -> None:
    """Method keys are LoRA's (r, alpha, dropout, targets, rslora), checked by config.validate."""
    check = getattr(lora, "validate", None)
    if check:
        check(mcfg)


def check_config(cfg) -> None:
    """Model/method agreement, from config.validate (no model, no process group)."""
    q, name = cfg.model.quantization, cfg.method.name
    if name == "qlora" and q == "none":
        raise ConfigError("method.name='qlora': needs a quantized base; set model.quantization=nf4 (or fp4, int8)")
    if name != "qlora" and q != "none":
        raise ConfigError(f"model.quantization={q!r}: a quantized base can only be adapted with method.name=qlora "
                          f"(or set model.quantization=none for {name!r})")
    if q != "none" and cfg.model.dtype == "fp16":
        raise ConfigError("model.dtype='fp16': qlora computes in the base dtype; use model.dtype=bf16 or fp32")


MERGE_REFUSED = ("qlora: cannot merge into a quantized base (adding B A to packed 4/8-bit codes would requantize "
                 "and change the base); load the adapter on the full-precision base with method.name=lora and "
                 "merge there")


class QLoRA(lora.LoRA):
    """LoRA over a bitsandbytes layer: identical math and parameters; it never merges."""

    def merge(self, sign: float = 1.0) -> None:
        raise BigadaptError(MERGE_REFUSED)


def inject(model: nn.Module, mcfg) -> list[str]:
    """lora.inject with the QLoRA wrapper; targets resolve to the quantized Linear4bit/Linear8bitLt layers."""
    return lora.inject(model, mcfg, cls=QLoRA)


def merge(model: nn.Module) -> None:
    raise BigadaptError(MERGE_REFUSED)


def unmerge(model: nn.Module) -> None:
    """Nothing is ever merged into a quantized base."""
