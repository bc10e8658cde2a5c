"""The frozen base: loaded by hub id or local directory, or built from a transformers config.

Under ZeRO-3 the DeepSpeed config is registered first (zero.register_for_loading), so from_pretrained and
from_config run under zero.Init and each rank keeps only its partition while reading: no rank ever
holds the whole base. A meta-device build (no weights) serves validation and accounting.
"""
from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path

import torch
from torch import nn

from . import zero
from .errors import ConfigError

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _auto_class(objective: str):
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification
    return AutoModelForCausalLM if objective == "causal_lm" else AutoModelForSequenceClassification


def hf_config(mcfg):
    """The transformers config for the base, resolved offline when the hub is unreachable."""
    from transformers import AutoConfig
    if mcfg.name_or_path:
        try:
            config = AutoConfig.from_pretrained(mcfg.name_or_path, trust_remote_code=mcfg.trust_remote_code)
        except (OSError, ValueError) as e:
            raise ConfigError(
                f"model.name_or_path={mcfg.name_or_path!r}: cannot be resolved ({str(e).splitlines()[0][:120]}); "
                f"offline, pass a local directory holding config.json and the weights") from None
    else:
        arch = dict(mcfg.arch)
        try:
            config = AutoConfig.for_model(arch.pop("model_type"), **arch)
        except (ValueError, TypeError) as e:
            raise ConfigError(f"model.arch: {e}; fix model_type or the field names") from None
    if mcfg.objective == "seq_cls":
        config.num_labels = mcfg.num_labels
        if mcfg.num_labels == 1:
            config.problem_type = "regression"
        if getattr(config, "pad_token_id", None) is None:
            # decoder-only classifiers pool at the last non-pad token, so they need a pad id
            config.pad_token_id = 0
    return config


def build_base(mcfg, seed: int) -> nn.Module:
    """Load or build the base in its configured dtype (partitioned while loading if ZeRO-3 is registered).

    What is random (the whole base when built from a config, else a fresh task head) is drawn per
    parameter name from `seed`, so it is the same on any world size and in a plain single process.
    """
    from . import targets
    config = hf_config(mcfg)
    if getattr(mcfg, "attn_implementation", None):  # model.attn_implementation (recompute.py): every loading path
        config._attn_implementation = mcfg.attn_implementation  # reads the config, so it is set once, here
    auto = _auto_class(mcfg.objective)
    dtype = DTYPES[mcfg.dtype]
    if mcfg.quantization != "none":
        model = _build_quantized(mcfg, config, auto, dtype, seed)
        targets.mark_blocks(model, mcfg.blocks)
        return model
    if mcfg.name_or_path:
        model = from_pretrained(auto, mcfg.name_or_path, config=config, dtype=dtype,
                                trust_remote_code=mcfg.trust_remote_code)
        random_init(model, seed, targets.head_prefixes(model))
    else:
        model = auto.from_config(config, dtype=dtype, trust_remote_code=mcfg.trust_remote_code)
        random_init(model, seed, None)
    model.train()  # from_pretrained returns eval mode; training mode is what every method expects
    targets.mark_blocks(model, mcfg.blocks)  # model.blocks: where per-block methods find the blocks
    return model


def from_pretrained(auto, path: str, sharded: bool = True, **kwargs) -> nn.Module:
    """`auto.from_pretrained` (under ZeRO-3 with safetensors: `loading.load_sharded`, each rank reading only its
    partitions; `sharded=False` forces transformers' own path, for comparisons) that keeps transformers' load
    report: every parameter the checkpoint lacks becomes part of the task head (`model.bigadapt_new_modules`,
    read by `targets.head_prefixes`: drawn from the run's seed, trained and saved with the adapter, exported in
    PEFT's modules_to_save), instead of a random draw per process that nothing saves. That part of the report is
    one info line; anything unexpected stays a warning."""
    from transformers.utils import logging as hf_logging
    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its report calls a fresh head "MISSING": ours below says what happens to it
    try:
        model, info = _load(auto, path, sharded, **kwargs)
    except Exception as e:
        _unreadable_weights(path, e)
        raise
    finally:
        hf_logging.set_verbosity(level)
    model.bigadapt_new_modules = new_modules(model, info.get("missing_keys", ()))
    _load_report(path, model.bigadapt_new_modules, info)
    return model


def _load(auto, path: str, sharded: bool, **kwargs):
    """(model, loading info): the sharded reader where it applies, else transformers' from_pretrained, saying so
    in one line when that means rank 0 reads the whole checkpoint (ZeRO-3)."""
    from . import display, loading
    if kwargs.get("quantization_config") is not None and zero.registered_stage() == 3 and sharded:
        return _load_quantized(auto, path, **kwargs)
    reason = loading.fallback_reason(kwargs, kwargs.get("config")) if sharded else "asked for (sharded=False)"
    if reason is None:
        model, reason = loading.load_sharded(auto, path, **kwargs)
        if model is not None:
            return model, reason
    if zero.registered_stage() == 3 and sharded:
        display.log(f"{path}: loaded by transformers' from_pretrained (rank 0 reads the whole checkpoint and "
                    f"broadcasts it): {reason}")
    return auto.from_pretrained(path, output_loading_info=True, **kwargs)


def _load_quantized(auto, path: str, **kwargs):
    """A bitsandbytes base under ZeRO-3: quantized_loading's stream where it applies (each rank keeps only its
    partition of the packed codes, plus every quant state whole), else transformers' path, saying in one line that
    every rank then holds the whole quantized base until deepspeed.initialize partitions it."""
    from . import display, quantized_loading
    reason = quantized_loading.fallback_reason(kwargs)
    if reason is None:
        model, info = quantized_loading.load_sharded_4bit(auto, path, **kwargs)
        if model is not None:
            held = quantized_loading.holdings(model)
            display.log(f"{path}: 4-bit base read and quantized tensor by tensor, partitioned as read: rank 0 holds "
                        f"{held['codes_bytes']:,} of {held['codes_whole']:,} bytes of packed codes, "
                        f"{held['other_bytes']:,} of {held['other_whole']:,} of other tensors, and every quant "
                        f"state whole ({held['state_bytes']:,} bytes)")
            return model, info
        reason = info
    display.log(f"{path}: quantized by transformers' from_pretrained: every rank reads every shard and holds the "
                f"whole quantized base until deepspeed.initialize partitions it ({reason})")
    return auto.from_pretrained(path, output_loading_info=True, **kwargs)


def _unreadable_weights(path: str, error: Exception) -> None:
    """A truncated or garbage weights file in a local base directory: one line naming it, not safetensors' traceback
    (which names no file). Other errors are left to their own message."""
    from safetensors import SafetensorError, safe_open
    folder = Path(path)
    if not isinstance(error, SafetensorError) or not folder.is_dir():
        return
    for weights in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(weights), framework="pt") as f:
                f.keys()
        except (SafetensorError, OSError) as e:
            raise ConfigError(f"model.name_or_path={path!r}: {weights} is not a readable safetensors file "
                              f"({str(e).splitlines()[0]}); it is truncated or damaged: copy it again") from None
    raise ConfigError(f"model.name_or_path={path!r}: a weights file is unreadable ({error}); copy the model again") \
        from None


def new_modules(model: nn.Module, missing) -> list[str]:
    """The largest modules whose parameters are all missing from the checkpoint (e.g. `bert.pooler`, `classifier`),
    in model order. Missing buffers are left out: transformers computes those (position ids, rotary tables)."""
    params = [n for n, _ in model.named_parameters()]
    gone = set(missing) & set(params)
    if not gone:
        return []
    found = set()
    for owner in {n.rpartition(".")[0] for n in gone}:
        while owner and _all_missing(owner.rpartition(".")[0], params, gone):
            owner = owner.rpartition(".")[0]
        if owner:  # a parameter of the root module itself has no module to save: left as transformers made it
            found.add(owner)
    found = {m for m in found if not any(m.startswith(o + ".") for o in found)}
    return [n for n, _ in model.named_modules() if n in found]


def _all_missing(module: str, params: list[str], gone: set[str]) -> bool:
    # the root is never "missing": climbing stops below it
    return bool(module) and all(p in gone for p in params if p.startswith(module + "."))


def _load_report(path: str, new: list[str], info: dict) -> None:
    from . import display
    if new:
        display.log(f"{path}: not in the checkpoint, trained and saved as part of the task head: {', '.join(new)}")
    for key in ("unexpected_keys", "mismatched_keys", "error_msgs"):
        if info.get(key):
            shown = sorted(map(str, info[key]))
            display.log(f"warning: {path}: {key.replace('_', ' ')} while loading: {', '.join(shown[:8])}"
                        f"{f' (+{len(shown) - 8} more)' if len(shown) > 8 else ''}")


# ---------------------------------------------------------------- bitsandbytes-quantized base (QLoRA)
def bnb_config(mcfg):
    """The BitsAndBytesConfig for model.quantization. The 4-bit compute dtype is the base dtype, and the
    packed weights are stored in that dtype too (`bnb_4bit_quant_storage`): peft's recipe for ZeRO-3, and
    it keeps DeepSpeed's `module.bfloat16()` from casting packed bytes as if they were numbers."""
    from transformers import BitsAndBytesConfig
    if mcfg.quantization == "int8":
        return BitsAndBytesConfig(load_in_8bit=True)
    dtype = DTYPES[mcfg.dtype]
    return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mcfg.quantization,
                              bnb_4bit_compute_dtype=dtype, bnb_4bit_quant_storage=dtype,
                              bnb_4bit_use_double_quant=True)


def _build_quantized(mcfg, config, auto, dtype: torch.dtype, seed: int) -> nn.Module:
    """from_pretrained with a BitsAndBytesConfig; a config-built base is first built in full precision with
    the usual deterministic `random_init`, saved to a temporary directory and read back quantized. The
    round trip reuses transformers' own choice of which layers to quantize (not the head, not tied
    weights), so a random base and the same base saved by the user quantize identically. It needs the
    full-precision base once in memory and on disk: random bases are for tests and tiny experiments."""
    import tempfile

    from . import targets
    kwargs = dict(config=config, dtype=dtype, quantization_config=bnb_config(mcfg),
                  trust_remote_code=mcfg.trust_remote_code)
    if mcfg.name_or_path:
        model = from_pretrained(auto, mcfg.name_or_path, **kwargs)
        random_init(model, seed, targets.head_prefixes(model))
    else:
        with tempfile.TemporaryDirectory(prefix="bigadapt-qbase-") as tmp:
            with zero.loading_paused():  # every rank builds the same deterministic base whole, into its own directory
                full = auto.from_config(config, dtype=dtype, trust_remote_code=mcfg.trust_remote_code)
                random_init(full, seed, None)
                _save_whole(full, tmp)
                del full
            model = from_pretrained(auto, tmp, **kwargs)  # under ZeRO-3: quantized_loading's stream
    no_cpu_repack(model)
    model.train()
    return model


def _save_whole(model: nn.Module, directory: str) -> None:
    """What from_pretrained reads, written by this rank (save_pretrained writes on rank 0 only)."""
    from pathlib import Path

    from safetensors.torch import save_model
    model.config.save_pretrained(directory)
    save_model(model, str(Path(directory) / "model.safetensors"), metadata={"format": "pt"})  # tied: stored once


def no_cpu_repack(model: nn.Module) -> None:
    """bitsandbytes on an avx512_bf16 CPU repacks a Linear4bit's weight for inference, permanently, on its
    first eval-mode no-grad forward (an evaluation); every later training forward then fails. The repack
    also changes the stored bytes the base fingerprint hashes. Switch it off on every 4-bit layer."""
    for m in model.modules():
        if hasattr(m, "support_avx512bf16_for_cpu"):
            m.support_avx512bf16_for_cpu = False


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the Linear/Conv1D modules transformers' bitsandbytes quantizer would convert in this
    (meta or real) unquantized model: all but the output head, tied weights and fp32-pinned modules."""
    from transformers.quantizers.base import HfQuantizer

    from .targets import _conv1d
    skip = HfQuantizer.get_modules_to_not_convert(model, None, getattr(model, "_keep_in_fp32_modules", None))
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Linear, _conv1d()))
            and not any(n == k or n.endswith("." + k) or n.startswith(k + ".") for k in skip)]


def random_init(model: nn.Module, seed: int, prefixes: list[str] | None, std: float = 0.02) -> None:
    """*Collective.* BERT/GPT-style init (normal(0, std) matrices and embeddings, zero biases, unit norms),
    each tensor from its own generator seeded by (seed, name): independent of construction order."""
    import zlib

    for name, p in model.named_parameters():
        if prefixes is not None and not any(name.startswith(x + ".") for x in prefixes):
            continue
        shape = zero.full_shape(p)
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
        if len(shape) >= 2:
            value = torch.randn(shape, generator=g) * std
        else:
            value = torch.zeros(shape) if name.endswith("bias") else torch.ones(shape)
        with torch.no_grad(), zero.gathered([p], modify=True) as writer:
            if writer:
                p.data.copy_(value.to(p.dtype))


def build_meta(mcfg) -> nn.Module:
    """The base on the meta device: shapes and module names only, no memory, in seconds even for 175B.

    A `model.arch` beside name_or_path describes the same shape and is used here without touching the
    network, so estimates work on a laptop; loading the weights for training still uses name_or_path.
    """
    config = hf_config(dataclasses.replace(mcfg, name_or_path=None) if mcfg.arch else mcfg)
    from . import targets
    with torch.device("meta"), _objective_errors(mcfg, config):
        model = _auto_class(mcfg.objective).from_config(config, dtype=DTYPES[mcfg.dtype])
    targets.mark_blocks(model, mcfg.blocks)
    return model


@contextlib.contextmanager
def _objective_errors(mcfg, config):
    """transformers says 'Unrecognized configuration class' when an architecture lacks the objective's head."""
    try:
        yield
    except ValueError as e:
        if "Unrecognized configuration class" not in str(e):
            raise
        raise ConfigError(f"model.objective={mcfg.objective}: {config.model_type} has no {mcfg.objective} head; "
                          f"choose the other objective") from None


def pad_id(model: nn.Module) -> int:
    pid = getattr(model.config, "pad_token_id", None)
    return 0 if pid is None else int(pid)
