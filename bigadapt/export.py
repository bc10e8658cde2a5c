"""Leaving bigadapt: the PEFT adapter format, and a merged Hugging Face model. One CPU process, no DeepSpeed.

PEFT has no per-slice LoRA on a fused projection, so GPT-2's q,v-only `c_attn` LoRA is written as a
c_attn LoRA of rank k*r whose B is block-structured (zero rows for the disabled k slice): the same
delta, exactly. Scaling is carried by a per-module alpha (alpha_pattern), so rsLoRA and fused ranks load
with the scaling they were trained with.
"""
from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checkpoint, methods, targets
from . import model as base_model
from .config import config_from_dict
from .errors import CheckpointError
from .methods.lora import lora_modules

PEFT_TASK = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its newest complete checkpoint; a step-* directory means itself."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    found = checkpoint.find_resume(path / "checkpoints", "auto")
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (expected {path}/checkpoints/step-*/manifest.json)")
    return found


def load_trained(path: str | Path, untrained: bool = False):
    """(model with the adapter loaded, manifest, run config), rebuilt on the CPU from the manifest.
    untrained=True: the adapter as the run initialised it instead (drawn again from its seed)."""
    ckpt = resolve_checkpoint(path)
    manifest = checkpoint.verify(ckpt)
    cfg = config_from_dict(manifest["config"])
    # transformers reports a seq_cls head "MISSING" from a headless base: the adapter file holds the trained
    # head, and a changed base fails the fingerprint check below, so the report would only mislead
    with _quiet_transformers():
        model = base_model.build_base(cfg.model, cfg.train.seed)
    base_fp = checkpoint.fingerprint(model, exclude=targets.head_prefixes(model))
    methods.apply_seeded(model, cfg)
    if untrained:  # the control too must come from the base the run trained on
        checkpoint.check_fingerprint(manifest["base"], base_fp, ckpt)
    else:
        checkpoint.load_adapter(ckpt, model, base_fp)
    return model.eval(), manifest, cfg


@contextlib.contextmanager
def _quiet_transformers():
    from transformers.utils import logging as hf_logging
    level, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


def to_peft(path: str | Path, out: str | Path) -> int:
    model, manifest, cfg = load_trained(path)
    if cfg.method.name not in ("lora", "qlora"):
        raise CheckpointError(f"{path}: PEFT export covers LoRA and QLoRA; this run used {cfg.method.name!r}")
    tensors, rank_pattern, alpha_pattern, fan_in_fan_out = {}, {}, {}, False
    for name, m in lora_modules(model):
        rank = m.lora_A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = _full_B(m)
        rank_pattern[name], alpha_pattern[name] = rank, m.scaling * rank
        fan_in_fan_out |= m.fan_in_fan_out
    heads = [h for h in targets.head_prefixes(model) if cfg.model.objective == "seq_cls" and cfg.method.train_head]
    for n, p in model.named_parameters():
        if any(n.startswith(h + ".") for h in heads):
            tensors[f"base_model.model.{n}"] = p.detach().float().contiguous()
    first = next(iter(rank_pattern))
    config = {
        "peft_type": "LORA", "task_type": PEFT_TASK[cfg.model.objective],
        "base_model_name_or_path": cfg.model.name_or_path, "r": rank_pattern[first],
        "lora_alpha": alpha_pattern[first], "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(rank_pattern), "lora_dropout": cfg.method.dropout, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "modules_to_save": heads or None, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True,
    }
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    print(f"wrote PEFT adapter {out} ({len(rank_pattern)} LoRA modules, step {manifest['step']})")
    return 0


def _full_B(m) -> torch.Tensor:
    """B laid out over the whole output: block-diagonal over the enabled slices, zero elsewhere."""
    B = torch.zeros(m.out_features, m.lora_A.shape[0])
    row = 0
    for i, (a, b) in enumerate(m.spans):
        B[a:b, i * m.r:(i + 1) * m.r] = m.lora_B.detach().float()[row:row + b - a]
        row += b - a
    return B


def fold(model, cfg) -> None:
    """Fold the trained method into the base weights and drop its wrappers; methods that cannot merge say why."""
    method = methods.get(cfg.method.name)
    method.merge(model)
    if hasattr(method, "unwrap"):
        method.unwrap(model)


def merged(path: str | Path, out: str | Path) -> int:
    """The trained model as a plain Hugging Face directory; methods that cannot merge say why (one line)."""
    model, manifest, cfg = load_trained(path)
    fold(model, cfg)
    model.requires_grad_(False)
    model.save_pretrained(out)
    print(f"wrote merged model {out} (step {manifest['step']}, base {manifest['base']['model_type']})")
    return 0
