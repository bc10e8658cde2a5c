"""The frozen base: loaded by hub id or local directory, or built from a transformers config.

Under ZeRO-3 the DeepSpeed config is registered first (zero.register_for_loading), so from_pretrained and
from_config run under zero.Init and each rank keeps only its partition while reading: no rank ever
holds the whole base. A meta-device build (no weights) serves validation and accounting.
"""
from __future__ import annotations

import contextlib
import dataclasses

import torch
from torch import nn

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
    auto = _auto_class(mcfg.objective)
    dtype = DTYPES[mcfg.dtype]
    if mcfg.name_or_path:
        model = auto.from_pretrained(mcfg.name_or_path, config=config, dtype=dtype,
                                     trust_remote_code=mcfg.trust_remote_code)
        random_init(model, seed, targets.head_prefixes(model))
    else:
        model = auto.from_config(config, dtype=dtype, trust_remote_code=mcfg.trust_remote_code)
        random_init(model, seed, None)
    model.train()  # from_pretrained returns eval mode; training mode is what every method expects
    return model


def random_init(model: nn.Module, seed: int, prefixes: list[str] | None, std: float = 0.02) -> None:
    """*Collective.* BERT/GPT-style init (normal(0, std) matrices and embeddings, zero biases, unit norms),
    each tensor from its own generator seeded by (seed, name): independent of construction order."""
    import zlib

    from . import zero
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
    with torch.device("meta"), _objective_errors(mcfg, config):
        return _auto_class(mcfg.objective).from_config(config, dtype=DTYPES[mcfg.dtype])


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
