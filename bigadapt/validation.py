"""Value checks of a run config (bigadapt.config builds it, this module refuses impossible values): every one a
ConfigError naming the key, the bad value and the fix, before any model, file or process group exists."""
from __future__ import annotations

from .config import DTYPES, OBJECTIVES, QUANTIZATIONS, SCHEDULES, RunConfig, _check


def validate(cfg: RunConfig) -> None:
    """Value checks that need no model, no files and no process group."""
    from . import methods, tracking
    from .data import TASKS
    from .layout import configured_budget
    from .methods import METHODS

    m, me, d, t, z = cfg.model, cfg.method, cfg.data, cfg.train, cfg.zero
    _check(m.dtype in DTYPES, "model.dtype", m.dtype, f"use one of {', '.join(DTYPES)}")
    _check(m.objective in OBJECTIVES, "model.objective", m.objective, f"use one of {', '.join(OBJECTIVES)}")
    _check(m.num_labels >= 1, "model.num_labels", m.num_labels, "must be >= 1 (1 = regression)")
    _check(bool(m.name_or_path) or "model_type" in m.arch, "model.arch", m.arch,
           "set model.name_or_path (hub id or local dir) or model.arch with a model_type")
    _check(me.name in METHODS, "method.name", me.name, f"unknown method; choose one of {', '.join(sorted(METHODS))}")
    _check(me.r > 0, "method.r", me.r, "the rank must be a positive integer")
    _check(me.alpha > 0, "method.alpha", me.alpha, "alpha must be > 0 (the paper sets it to the first r tried)")
    _check(0 <= me.dropout < 1, "method.dropout", me.dropout, "dropout is a probability in [0, 1)")
    _check(len(me.targets) > 0, "method.targets", me.targets, "name at least one target, e.g. [q, v]")
    for key in ("l_p", "l_i", "top_k", "adapter_drop"):
        _check(getattr(me, key) >= 0, f"method.{key}", getattr(me, key), "must be >= 0")
    _check(me.lr_ratio > 0 and (me.lr_ratio == 1.0 or me.name in ("lora", "qlora", "lora+pe", "lora+pl")),
           "method.lr_ratio", me.lr_ratio, "LoRA+ (B's lr = lr_ratio x A's): a ratio > 0 (e.g. 16), for a LoRA method")
    methods.validate(me)
    _check(m.quantization in QUANTIZATIONS, "model.quantization", m.quantization,
           f"use one of {', '.join(QUANTIZATIONS)}")
    methods.get("qlora").check_config(cfg)  # quantization <-> method qlora, compute dtype
    _check(d.task in TASKS, "data.task", d.task, f"unknown task; choose one of {', '.join(sorted(TASKS))}")
    _check(d.seq_len > 0, "data.seq_len", d.seq_len, "must be > 0")
    _check(0 < d.fraction <= 1, "data.fraction", d.fraction, "a fraction of the training split in (0, 1]")
    _check(d.max_examples >= 0, "data.max_examples", d.max_examples, "must be >= 0 (0 = all examples)")
    _check_user_data(cfg)
    _check(t.micro_batch > 0, "train.micro_batch", t.micro_batch, "must be a positive integer")
    _check(t.batch_size > 0, "train.batch_size", t.batch_size, "must be a positive integer")
    _check(t.batch_size % t.micro_batch == 0, "train.batch_size", t.batch_size,
           f"must be a multiple of train.micro_batch={t.micro_batch}")
    _check(t.lr > 0, "train.lr", t.lr, "the learning rate must be > 0")
    _check(t.weight_decay >= 0, "train.weight_decay", t.weight_decay, "must be >= 0")
    _check(len(t.adam_betas) == 2 and all(0 <= b < 1 for b in t.adam_betas), "train.adam_betas", t.adam_betas,
           "give two numbers in [0, 1), e.g. [0.9, 0.999]")
    _check(t.max_steps >= 0, "train.max_steps", t.max_steps, "must be >= 0 (0 = use train.epochs)")
    _check(t.max_steps > 0 or t.epochs > 0, "train.epochs", t.epochs, "must be > 0 when train.max_steps is 0")
    _check(t.warmup_steps >= 0, "train.warmup_steps", t.warmup_steps, "must be >= 0")
    _check(0 <= t.warmup_ratio < 1, "train.warmup_ratio", t.warmup_ratio, "a fraction of the run's steps in [0, 1)")
    _check(not (t.warmup_steps and t.warmup_ratio), "train.warmup_ratio", t.warmup_ratio,
           f"set train.warmup_steps={t.warmup_steps} or train.warmup_ratio, not both")
    _check(0 <= t.min_lr_ratio < 1, "train.min_lr_ratio", t.min_lr_ratio, "a fraction of train.lr in [0, 1)")
    _check(not (t.min_lr_ratio and t.schedule == "constant"), "train.min_lr_ratio", t.min_lr_ratio,
           "the constant schedule never decays; drop it or use schedule linear or cosine")
    _check(t.clip >= 0, "train.clip", t.clip, "must be >= 0 (0 disables clipping)")
    _check(0 <= t.label_smoothing < 1, "train.label_smoothing", t.label_smoothing, "a probability in [0, 1), e.g. 0.1")
    _check(t.keep_last >= 1, "train.keep_last", t.keep_last, "keep at least 1 checkpoint")
    _check(t.data_workers is None or t.data_workers >= 0, "train.data_workers", t.data_workers,
           "must be >= 0 (0 = collate on the training thread), or null for the default")
    _check(t.max_loss_spike == 0 or t.max_loss_spike > 1, "train.max_loss_spike", t.max_loss_spike,
           "0 (off) or a factor > 1 over the running loss, e.g. 5")
    _check(t.max_skipped_steps >= 0, "train.max_skipped_steps", t.max_skipped_steps, "must be >= 0 (0 = never stop)")
    for key in ("eval_every", "save_every", "log_every"):
        _check(getattr(t, key) >= 0, f"train.{key}", getattr(t, key), "must be >= 0")
    _check(t.time_budget_s >= 0, "train.time_budget_s", t.time_budget_s, "must be >= 0 (0 = no budget)")
    _check(t.schedule in SCHEDULES, "train.schedule", t.schedule, f"use one of {', '.join(SCHEDULES)}")
    tracking.check(t.track)
    _check_recompute(cfg)
    _check(all(x > 0 for x in t.eval_at_s) and list(t.eval_at_s) == sorted(t.eval_at_s), "train.eval_at_s",
           t.eval_at_s, "give increasing training-clock seconds > 0, e.g. [30, 60, 120]")
    _check(z.stage in (None, "auto", 0, 1, 2, 3), "zero.stage", z.stage,
           "ZeRO stage must be 0, 1, 2, 3, auto (chosen from the memory budget) or null (3 on 2+ ranks, else 0)")
    configured_budget(z)  # zero.memory_budget: a size such as 80GiB, or bytes
    for key in ("param_persistence_threshold", "prefetch_bucket_size", "max_live_parameters", "max_reuse_distance"):
        _check(getattr(z, key) is None or getattr(z, key) >= 0, f"zero.{key}", getattr(z, key),
               "must be >= 0 elements, or null for the default")
    _check_offload(cfg)


ATTN_IMPLEMENTATIONS = ("eager", "sdpa", "flash_attention_2")


def _check_recompute(cfg: RunConfig) -> None:
    """The activation-memory levers. Whether this machine can run flash_attention_2 is recompute.check_runnable's
    (an estimate for a GPU cluster may be made on a laptop)."""
    m, t = cfg.model, cfg.train
    _check(m.attn_implementation is None or m.attn_implementation in ATTN_IMPLEMENTATIONS, "model.attn_implementation",
           m.attn_implementation, f"use one of {', '.join(ATTN_IMPLEMENTATIONS)}, or null for transformers' choice")
    _check(t.checkpoint_every >= 1, "train.checkpoint_every", t.checkpoint_every,
           "checkpoint every k-th transformer block: k >= 1 (1 = every block)")
    for key, default in (("checkpoint_every", 1), ("checkpoint_reentrant", None)):
        _check(t.activation_checkpointing or getattr(t, key) == default, f"train.{key}", getattr(t, key),
               "only used with train.activation_checkpointing=true; set that too, or remove this key")


OFFLOAD = ("none", "cpu", "nvme")


def _check_offload(cfg: RunConfig) -> None:
    """Offload combinations DeepSpeed refuses, and the user's DeepSpeed JSON, before any process group. What
    needs the world size (stage None) or the machine (libaio) is engine.check_runnable's."""
    from .engine import check_user_config
    z = cfg.zero
    for key in ("offload_optimizer", "offload_param"):
        _check(getattr(z, key) in OFFLOAD, f"zero.{key}", getattr(z, key), f"use one of {', '.join(OFFLOAD)}")
    _check(z.offload_param == "none" or z.stage in (None, "auto", 3), "zero.offload_param", z.offload_param,
           f"parameter offload needs ZeRO stage 3 (zero.stage={z.stage}); set zero.stage=3 or offload_param=none")
    _check(z.offload_optimizer == "none" or z.stage != 0, "zero.offload_optimizer", z.offload_optimizer,
           "optimizer offload needs ZeRO stage 1, 2 or 3 (zero.stage=0); set zero.stage")
    _check(z.offload_optimizer != "nvme" or z.stage in (None, "auto", 3), "zero.offload_optimizer", z.offload_optimizer,
           f"NVMe offload needs ZeRO stage 3 (zero.stage={z.stage}); set zero.stage=3 or offload_optimizer=cpu")
    nvme = "nvme" in (z.offload_optimizer, z.offload_param)
    _check(not nvme or bool(z.nvme_path), "zero.nvme_path", z.nvme_path,
           "nvme offload writes swap files there: set zero.nvme_path to a directory on a local NVMe drive")
    _check(nvme or z.nvme_path is None, "zero.nvme_path", z.nvme_path,
           "only used with zero.offload_optimizer or zero.offload_param = nvme; remove it")
    check_user_config(cfg)  # a missing or malformed file, or a conflicting key, refused before anything starts


USER_TASKS = ("sft", "text", "cls")
PACKING_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma", "gpt2")  # packed rows verified for these
PREFIX_METHODS = ("pre_embed", "pre_layer", "lora+pe", "lora+pl")  # need an attention mask, which packing drops


def _check_user_data(cfg: RunConfig) -> None:
    """The keys of tasks sft/text/cls: the task's objective, the columns, the eval split and packing."""
    m, d = cfg.model, cfg.data
    _check(0 < d.eval_fraction < 1, "data.eval_fraction", d.eval_fraction, "a fraction in (0, 1), e.g. 0.05")
    _check(m.tokenizer is None or bool(m.tokenizer.strip()), "model.tokenizer", m.tokenizer,
           "give a tokenizer directory or hub id, or null")
    for key in ("prompt_column", "completion_column", "messages_column", "text_column", "label_column"):
        _check(bool(getattr(d, key).strip()), f"data.{key}", getattr(d, key), "name a column of the data")
    _check(d.text_pair_column is None or bool(d.text_pair_column.strip()), "data.text_pair_column",
           d.text_pair_column, "name a column of the data, or null")
    _check(d.chat_template is None or bool(d.chat_template.strip()), "data.chat_template", d.chat_template,
           "a Jinja string, a path to a .jinja file, or null for the tokenizer's own")
    if d.task not in USER_TASKS:
        return
    _check(bool(d.path), "data.path", d.path, f"task {d.task} reads your data: set data.path to a .jsonl/.json/"
           f".csv/.parquet file, a folder of split files, a save_to_disk folder or a hub dataset name")
    want = "seq_cls" if d.task == "cls" else "causal_lm"
    _check(m.objective == want, "model.objective", m.objective, f"task {d.task} needs model.objective={want}")
    if d.packing:
        _check(d.task == "sft", "data.packing", d.packing, "packing applies to task sft only; set it to false")
        _check(cfg.method.name not in PREFIX_METHODS, "data.packing", d.packing,
               f"method {cfg.method.name} needs an attention mask, which packed rows have none of; set false")
        arch = m.arch.get("model_type")
        _check(arch is None or arch in PACKING_MODEL_TYPES, "data.packing", d.packing,
               f"model_type {arch} cannot tell packed examples apart from position ids (verified: "
               f"{', '.join(PACKING_MODEL_TYPES)}); set data.packing=false")
