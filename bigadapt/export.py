"""Leaving bigadapt: the PEFT adapter format, and a merged Hugging Face model. One CPU process, no DeepSpeed.

PEFT has no per-slice LoRA on a fused projection, so GPT-2's q,v-only `c_attn` LoRA is written as a
c_attn LoRA of rank k*r whose B is block-structured (zero rows for the disabled k slice): the same
delta, exactly. Rank and scaling are carried per module (rank_pattern, alpha_pattern keyed by each module's
full name), so method.rank_pattern/alpha_pattern, rsLoRA and fused ranks load with the r and scaling they were
trained with. DoRA writes `use_dora` and each module's `lora_magnitude_vector` over its whole output.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from pathlib import Path

import torch
from safetensors.torch import save_file

from . import checkpoint, methods, targets
from . import fingerprint as fp
from . import model as base_model
from .config import config_from_dict
from .errors import CheckpointError
from .export_init import to_original_base
from .methods.dora import DoRA
from .methods.lora import lora_modules

PEFT_TASK = {"seq_cls": "SEQ_CLS", "causal_lm": "CAUSAL_LM"}
# What leaves bigadapt, by method.name: the one table docs/methods.md quotes and tests/test_export_cases.py checks
# against the behaviour for every name in methods.METHODS. PEFT export: LoRA and QLoRA (its DoRA, rsLoRA, PiSSA/OLoRA
# and pattern variants included). Merge: whatever folds into the base's own tensors; each other method's `merge`
# refuses in one line saying why (adapters, prefixes, a quantized base).
PEFT_METHODS = frozenset({"lora", "qlora"})
MERGEABLE = frozenset({"lora", "bitfit", "full", "ft_top_k"})


def resolve_checkpoint(path: str | Path) -> Path:
    """A run directory means its newest complete checkpoint; a step-* directory means itself."""
    path = Path(path)
    if (path / "manifest.json").is_file():
        return path
    found = checkpoint.find_resume(path / "checkpoints", "auto")
    if found is None:
        raise CheckpointError(f"{path}: no complete checkpoint (expected {path}/checkpoints/step-*/manifest.json)")
    return found


def read_run(path: str | Path) -> tuple[Path, dict, object]:
    """(checkpoint directory, its verified manifest, the run config) without building anything."""
    ckpt = resolve_checkpoint(path)
    manifest = checkpoint.verify(ckpt)
    return ckpt, manifest, config_from_dict(manifest["config"])


def load_model(path: str | Path):
    """*Collective under a launcher.* What `generate` and `eval` run on: the trained model in this one process
    (`load_trained`), or, with WORLD_SIZE > 1, sharded over the ranks with ZeRO-3 (`load_trained_sharded`)."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        return load_trained_sharded(path)
    return load_trained(path)


def load_trained_sharded(path: str | Path):
    """*Collective.* (model, manifest, run config) like `load_trained`, but built as training builds it: the base
    partitioned while it is built or read (no rank ever holds it whole), the adapter loaded into the partitioned
    parameters, DeepSpeed's ZeRO-3 hooks installed for inference (no optimizer, no fp32 masters)."""
    import deepspeed

    from . import accounting, engine, zero
    ckpt, manifest, cfg = read_run(path)
    cfg = dataclasses.replace(cfg, zero=dataclasses.replace(cfg.zero, stage=3))  # sharded whatever it trained on
    engine.init_distributed()
    world = zero.world_size()
    conf = engine.ds_config(cfg, world, 1, accounting.shapes(cfg)[0])
    conf["train_batch_size"] = cfg.train.micro_batch * world
    zero.register_for_loading(conf)
    try:
        with _quiet_transformers():
            model = base_model.build_base(cfg.model, cfg.train.seed)
        base_fp = fp.fingerprint(model, exclude=targets.head_prefixes(model))
        methods.apply_seeded(model, cfg)
        engine.uniform_working_dtype(model, cfg)
        fp.check_fingerprint(manifest["base"], base_fp, ckpt)
        checkpoint.check_names(manifest, model, ckpt)
        tensors = checkpoint.read_tensors(ckpt, "adapter.safetensors")
        for name, p in model.named_parameters():  # model order: the same collectives on every rank
            if name in tensors:
                zero.set_param(p, tensors[name])
        model.requires_grad_(False)
        eng = deepspeed.initialize(model=model, config=conf)[0]
    finally:
        zero.unregister()
    return eng.module.eval(), manifest, cfg


def load_trained(path: str | Path, untrained: bool = False):
    """(model with the adapter loaded, manifest, run config), rebuilt on the CPU from the manifest.
    untrained=True: the adapter as the run initialised it instead (drawn again from its seed)."""
    ckpt, manifest, cfg = read_run(path)
    # transformers' progress bars and notices would repeat on every load; what the base lacked (the head, a
    # pooler) and anything unexpected is reported by model.from_pretrained itself
    with _quiet_transformers():
        model = base_model.build_base(cfg.model, cfg.train.seed)
    base_fp = fp.fingerprint(model, exclude=targets.head_prefixes(model))
    methods.apply_seeded(model, cfg)
    if untrained:  # the control too must come from the base the run trained on
        fp.check_fingerprint(manifest["base"], base_fp, ckpt)
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


def to_peft(path: str | Path, out: str | Path, overwrite: bool = False) -> int:
    out = _output_dir(out, overwrite, create=False)
    _, _, cfg = read_run(path)  # refused before a model is built or `out` is created
    if cfg.method.name not in PEFT_METHODS:
        raise CheckpointError(f"{path}: PEFT export covers LoRA and QLoRA; this run used {cfg.method.name!r}")
    out.mkdir(parents=True, exist_ok=True)
    model, manifest, cfg = load_trained(path)
    tensors, rank_pattern, alpha_pattern, fan_in_fan_out = {}, {}, {}, False
    for name, m in lora_modules(model):
        rank = m.lora_A.shape[0]
        tensors[f"base_model.model.{name}.lora_A.weight"] = m.lora_A.detach().float().contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = _full_B(m)
        if isinstance(m, DoRA):  # peft's key has no ".weight"; a disabled fused slice's rows keep their own norm
            tensors[f"base_model.model.{name}.lora_magnitude_vector"] = m.full_magnitude()
        rank_pattern[name], alpha_pattern[name] = rank, m.scaling * rank
        fan_in_fan_out |= m.fan_in_fan_out
    to_original_base(path, cfg, tensors, rank_pattern, alpha_pattern)  # PiSSA/OLoRA: a plain LoRA on W0 (rank 2r)
    # every weight no base file holds, trained or drawn from the run's seed: without it a peft user gets another model
    heads = targets.head_prefixes(model)
    for n, p in model.named_parameters():
        if any(n.startswith(h + ".") for h in heads):
            tensors[f"base_model.model.{n}"] = p.detach().float().contiguous()
    first = next(iter(rank_pattern))
    config = {
        "peft_type": "LORA", "task_type": PEFT_TASK[cfg.model.objective],
        "base_model_name_or_path": _export_base(model.config, cfg, out), "r": rank_pattern[first],
        "lora_alpha": alpha_pattern[first], "rank_pattern": rank_pattern, "alpha_pattern": alpha_pattern,
        "target_modules": sorted(rank_pattern), "lora_dropout": cfg.method.dropout, "bias": "none",
        "fan_in_fan_out": fan_in_fan_out, "modules_to_save": heads or None, "use_rslora": False,
        "init_lora_weights": True, "inference_mode": True, "use_dora": bool(cfg.method.dora),
    }
    save_file(tensors, out / "adapter_model.safetensors", metadata={"format": "pt"})
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2))
    normal_permissions(out)
    print(f"wrote PEFT adapter {out} ({len(rank_pattern)} LoRA modules, step {manifest['step']})")
    return 0


def _export_base(config, cfg, out: Path) -> str:
    """What peft loads the adapter onto. A hub id or directory stays as it is, with `base.json` beside the adapter
    saying which config overrides the run used (labels, a decoder classifier's pad id: a base config may have none).
    A base built from model.arch exists nowhere else, so it is written to `out/base` (its seeded weights, with those
    overrides in its config) and named by absolute path."""
    if not cfg.model.name_or_path:
        with _quiet_transformers():
            base_model.build_base(cfg.model, cfg.train.seed).save_pretrained(out / "base")
        print(f"the base was built from model.arch: wrote it to {out / 'base'} for peft to load")
        return str((out / "base").resolve())
    keys = ("num_labels", "pad_token_id", "problem_type") if cfg.model.objective == "seq_cls" else ("pad_token_id",)
    overrides = {k: getattr(config, k, None) for k in keys}
    (out / "base.json").write_text(json.dumps({"base_model_name_or_path": cfg.model.name_or_path,
                                               "config_overrides": overrides}, indent=2))
    return cfg.model.name_or_path


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


def merged(path: str | Path, out: str | Path, overwrite: bool = False, stream: bool = True) -> int:
    """The trained model as a Hugging Face directory that serves as is: weights, config, tokenizer files (when the
    run has a real tokenizer), generation_config.json (causal LMs). Methods that cannot merge say why (one line).

    A base in local safetensors files is merged tensor by tensor (`merge_stream`: never the whole model in
    memory); any other base, or stream=False, builds the model in this process and folds it as a whole."""
    from . import merge_stream
    from .engine import return_freed_memory
    return_freed_memory()  # each tensor's buffers go back to the system once written: peak ~ largest tensor
    out = _output_dir(out, overwrite, create=False)
    ckpt, manifest, cfg = read_run(path)
    merge_stream.refuse_unmergeable(cfg)  # before any weight is read or `out` is created
    out.mkdir(parents=True, exist_ok=True)
    src, why = merge_stream.find_source(cfg.model) if stream else (None, "stream=False")
    plan = None
    if src is not None:
        plan, why = merge_stream.plan(src, ckpt, manifest, cfg)
    if plan is None:
        if cfg.model.name_or_path and stream:
            print(f"merging in memory (the whole model in this process): {why}")
        model = _folded(path)
        generation = getattr(model, "generation_config", None)  # generative classes only
    else:
        model, generation = plan.skeleton, merge_stream.generation_config(src, plan.skeleton)
    tok = _merged_metadata(model, generation, manifest, cfg)
    if plan is None:
        model.save_pretrained(out)
    else:
        merge_stream.write(plan, src, out)
        model.config.architectures = [type(model).__name__]  # what save_pretrained records
        model.config.save_pretrained(out)
        if generation is not None and model.can_generate():
            generation.save_pretrained(out)
    _write_tokenizer(tok, cfg, out)
    normal_permissions(out)
    how = "streamed tensor by tensor" if plan is not None else "in memory"
    print(f"wrote merged model {out} (step {manifest['step']}, base {manifest['base']['model_type']}, {how})")
    return 0


def _folded(path):
    model, _, cfg = load_trained(path)
    fold(model, cfg)
    return model.requires_grad_(False)


def _merged_metadata(model, generation, manifest: dict, cfg):
    """Set the served eos/pad ids and the merge marker on the model's config and the generation config; returns
    the run's tokenizer. `model` may be the streaming merge's meta skeleton: only its config is read."""
    from .data.chat import stop_ids
    from .data.tasks import task_tokenizer
    tok = task_tokenizer(cfg, model.config.vocab_size)
    eos = stop_ids(tok, cfg.data, model.config.eos_token_id)  # a chat model's server stops at end of turn too
    if cfg.model.objective == "causal_lm" and generation is not None:
        generation.eos_token_id = eos
        generation.pad_token_id = base_model.pad_id(model)
    # the marker the fingerprint reads: this directory loaded as a base is refused for this run's checkpoints
    setattr(model.config, fp.MERGED_KEY, {"base_weights_sha256": manifest["base"].get("weights_sha256"),
                                          "adapter_sha256": manifest["files"]["adapter.safetensors"]["sha256"],
                                          "step": manifest["step"]})
    return tok


def _write_tokenizer(tok, cfg, out: Path) -> None:
    if getattr(tok, "is_fallback", False):
        print(f"no tokenizer files in {out}: the base was built from model.arch and its run used bigadapt's "
              f"byte-level fallback tokenizer (bigadapt.data.tokenizer.ByteTokenizer)")
        return
    if cfg.data.task == "sft":  # the template the run trained with, so a server renders chats the same way
        from .data.chat import chat_template
        tok.chat_template = chat_template(tok, cfg.data)
    tok.save_pretrained(out)


def _output_dir(out: str | Path, overwrite: bool, create: bool = True) -> Path:
    """The output directory, created (unless not `create`); one that exists with files in it is refused unless
    `overwrite` (then files of the same names are replaced, others left as they are)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out}: exists and is not a directory; choose another output path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise CheckpointError(f"{out}: is not empty; choose a new directory or pass --overwrite")
    if create:
        out.mkdir(parents=True, exist_ok=True)
    return out


def normal_permissions(out: Path) -> None:
    """safetensors writes its files mode 0600 (they are created through a private temporary file); give every file
    written here the mode the user's umask gives new files (0644 under the usual 022), as `cp` would."""
    mask = os.umask(0)
    os.umask(mask)
    for f in out.iterdir():
        if f.is_file():
            f.chmod(0o666 & ~mask)
