"""The run config: typed dataclasses, YAML + dotted `--set` overrides, and validation.

Every user mistake becomes one ConfigError naming the key, the bad value and the fix, raised before any
process group, download or file is created.
"""
from __future__ import annotations

import copy
import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from .errors import ConfigError

DTYPES = ("fp32", "bf16", "fp16")
OBJECTIVES = ("causal_lm", "seq_cls")
QUANTIZATIONS = ("none", "nf4", "fp4", "int8")  # bitsandbytes base for method qlora
SCHEDULES = ("linear", "cosine", "constant")  # after warmup


@dataclass
class ModelConfig:
    name_or_path: str | None = None  # hub id or local directory; None -> build from `arch`
    arch: dict = field(default_factory=dict)  # transformers config fields (needs model_type) for a random-init base
    objective: str = "seq_cls"  # causal_lm | seq_cls
    num_labels: int = 2  # seq_cls only; 1 = regression
    dtype: str = "fp32"  # frozen base dtype: fp32 | bf16 | fp16
    trust_remote_code: bool = False
    quantization: str = "none"  # none | nf4 | fp4 | int8: a bitsandbytes-quantized frozen base (method qlora)
    tokenizer: str | None = None  # a tokenizer directory or hub id; None = name_or_path's (config-built: bytes)
    # eager | sdpa | flash_attention_2, passed to transformers; None = transformers' choice (sdpa where torch has
    # it). Eager keeps every layer's b x heads x s x s attention probabilities for backward; the others do not.
    attn_implementation: str | None = None


@dataclass
class MethodConfig:
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # paper names or module-name patterns
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    train_head: bool = True  # a newly created task head (seq_cls) is trained and saved with the adapter
    l_p: int = 0  # prefix tuning: prefix tokens (pre_embed, pre_layer, lora+pe, lora+pl)
    l_i: int = 0  # prefix tuning: infix tokens
    top_k: int = 2  # ft_top_k: fine-tune the last k layers (the paper's FTTop2)
    bitfit_subset: bool = False  # bitfit: only query and FFN-intermediate biases (BitFit's subset variant)
    adapter_drop: int = 0  # adapter_d: no adapters in the lowest n layers (AdapterDrop)
    # start the method's tensors from another run's (a run dir or a step-N dir): the paper starts MRPC, RTE and
    # STS-B from the MNLI LoRA. Same base and method shapes; the task head starts fresh. Ignored on resume.
    init_from: str | None = None


@dataclass
class DataConfig:
    task: str = "synthetic_cls"
    path: str | None = None  # local data directory for file-backed tasks
    seq_len: int = 32
    num_train: int = 4096  # synthetic tasks: examples generated
    num_eval: int = 512
    fraction: float = 1.0  # file tasks: deterministic, nested subset of the training split (0.1 ⊂ 0.3 ⊂ 1.0)
    max_examples: int = 0  # file tasks: at most this many training examples (MNLI-n style); 0 = all
    # your own data (tasks sft, text, cls; docs/tasks.md "Your own data"); data.path is a file, a folder of
    # per-split files, a save_to_disk folder or a hub dataset name
    eval_path: str | None = None  # eval file; else the validation split; else eval_fraction of train held out
    eval_fraction: float = 0.05  # held out of train (seeded by train.seed) when there is no eval split
    prompt_column: str = "prompt"
    completion_column: str = "completion"
    messages_column: str = "messages"  # sft: [{role, content}, ...] rendered with the chat template
    text_column: str = "text"
    text_pair_column: str | None = None  # cls: a second text (sentence pairs)
    label_column: str = "label"
    chat_template: str | None = None  # None = the tokenizer's own; else a Jinja string or a .jinja file
    packing: bool = False  # sft: several examples per seq_len row, attention and positions kept per example


@dataclass
class TrainConfig:
    batch_size: int = 32  # global, in examples: the optimisation is defined by it, whatever the world size
    micro_batch: int = 8  # per rank; accumulation = batch_size / (micro_batch * world_size)
    lr: float = 1e-3
    weight_decay: float = 0.0
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    adam_eps: float = 1e-8
    warmup_steps: int = 0
    warmup_ratio: float = 0.0  # warmup as a fraction of the run's steps (rounded up); exclusive with warmup_steps
    # after warmup: linear or cosine decay to min_lr_ratio x lr at the last step, or constant (time-budgeted runs)
    schedule: str = "linear"
    min_lr_ratio: float = 0.0
    max_steps: int = 0  # 0 -> run `epochs` epochs
    epochs: float = 1.0
    clip: float = 1.0  # gradient-norm clipping; 0 disables
    label_smoothing: float = 0.0  # of training cross-entropy terms (Table 11: 0.1 for E2E, WebNLG); eval loss is plain
    eval_every: int = 0  # optimizer steps; 0 -> only at the end
    save_every: int = 0  # optimizer steps; 0 -> only at the end
    keep_last: int = 2  # checkpoints kept; older ones are deleted after a newer one is complete
    # divergence guard (docs/checkpoints.md): a non-finite loss or gradient norm always stops the run (exit 4) and
    # nothing is saved from it; also stop on a loss above max_loss_spike x its running mean (0 = off), and after
    # max_skipped_steps steps in a row that DeepSpeed skipped on overflow (fp16; 0 = never)
    max_loss_spike: float = 0.0
    max_skipped_steps: int = 20
    log_every: int = 10
    seed: int = 0
    # stop (eval, save) once this much training time is spent; 0 = none. The clock counts training steps only
    # (not loading, evaluation or saves) and carries over a resume, so a budget means the same work anywhere.
    time_budget_s: float = 0.0
    eval_at_s: list[float] = field(default_factory=list)  # also evaluate when the training clock passes these
    # copies of metrics.jsonl (always written) for tensorboard (local event files under run_dir/tensorboard, on by
    # default: no account, no network) and wandb (opt-in: an account and an upload, pip install 'bigadapt[wandb]')
    track: list[str] = field(default_factory=lambda: ["tensorboard"])
    wandb_project: str = "bigadapt"
    # Activation checkpointing (bigadapt/recompute.py): keep only each checkpointed block's input and recompute
    # the block in backward; every checkpoint_every-th block (1 = all). Reentrant or torch's non-reentrant form.
    activation_checkpointing: bool = False
    checkpoint_every: int = 1
    # null = automatic: non-reentrant, unless ZeRO-3 on a DeepSpeed that crashes recomputing frozen parameters
    checkpoint_reentrant: bool | None = None


@dataclass
class ZeroConfig:
    stage: int | None = None  # None -> 3 with two or more ranks, else 0
    # params smaller than this stay whole on every rank (fewer gathers); None = the DeepSpeed JSON's
    # stage3_param_persistence_threshold if it sets one, else DeepSpeed's 100_000
    param_persistence_threshold: int | None = None
    # How much of the frozen base a rank may hold gathered at once (elements). None = sized from the model
    # (accounting.gather_windows): prefetch one block ahead, at most two blocks live, keep a block only for
    # its immediate reuse, never more than DeepSpeed's defaults (5e7 / 1e9 / 1e9), which alone keep every
    # layer gathered from its forward to its backward: the whole base on each rank under ~1B parameters.
    prefetch_bucket_size: int | None = None
    max_live_parameters: int | None = None
    max_reuse_distance: int | None = None
    # Offload (none | cpu | nvme): optimizer -> fp32 masters, fp32 gradients and Adam moments live in host RAM
    # (or NVMe); param -> the frozen base's partitions do (ZeRO-3 only), gathered to the GPU block by block.
    offload_optimizer: str = "none"
    offload_param: str = "none"
    nvme_path: str | None = None  # a directory on a local NVMe drive, for either offload set to nvme
    # your own DeepSpeed JSON, merged under the keys bigadapt owns (docs/accounting.md, "Your DeepSpeed JSON")
    deepspeed_config: str | None = None


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    model: ModelConfig = field(default_factory=ModelConfig)
    method: MethodConfig = field(default_factory=MethodConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    zero: ZeroConfig = field(default_factory=ZeroConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# The embedded default (`deepspeed launch/train.py` with no --config): a random-init tiny GPT-2, frozen and
# sharded, adapted with LoRA on q and v of the fused c_attn to a synthetic task. Offline, ~1-2 min on 2 CPU
# cores with 2 ranks. configs/tiny-gpt2-lora.yaml is the same run as a file to copy from.
EMBEDDED_DEFAULT = {
    "run_dir": "runs/default",
    "model": {"arch": {"model_type": "gpt2", "n_layer": 4, "n_embd": 128, "n_head": 4, "vocab_size": 128,
                       "n_positions": 64, "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0,
                       "bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 0},
              "objective": "seq_cls", "num_labels": 2},
    "method": {"name": "lora", "r": 8, "alpha": 16, "targets": ["q", "v"]},
    "data": {"task": "synthetic_cls", "seq_len": 32, "num_train": 8192, "num_eval": 512},
    "train": {"batch_size": 32, "micro_batch": 16, "lr": 2e-3, "warmup_steps": 20, "max_steps": 250,
              "eval_every": 125, "save_every": 125, "log_every": 25},
    # always the real sharded path (even on one rank); partition every tensor, so each rank visibly holds 1/N
    "zero": {"stage": 3, "param_persistence_threshold": 0},
}


def load_config(path: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """YAML file (or the embedded default when None) + `a.b=c` overrides -> a validated RunConfig."""
    raw = _read_yaml(Path(path)) if path else copy.deepcopy(EMBEDDED_DEFAULT)
    for item in overrides:
        _apply_override(raw, item)
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    validate(cfg)
    return cfg


def _read_yaml(path: Path) -> dict:
    if not path.is_file():
        raise ConfigError(f"--config {path}: no such file; pass a YAML file such as configs/tiny-gpt2-lora.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"--config {path}{where}: not valid YAML ({getattr(e, 'problem', e)})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"--config {path}: the top level must be a mapping of sections (model, method, ...)")
    return raw


def _apply_override(raw: dict, item: str) -> None:
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set {item!r}: expected KEY=VALUE, e.g. --set train.lr=2e-4")
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        value = text
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
    node[parts[-1]] = value


def _build(cls: type, raw: Any, prefix: str):
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix.rstrip('.') or 'config'}: expected a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    for key in raw:
        if key not in names:
            raise ConfigError(f"{prefix}{key}: unknown key; valid keys here are {', '.join(names)}")
    kwargs = {k: _coerce(hints[k], v, prefix + k) for k, v in raw.items()}
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str):
    if dataclasses.is_dataclass(tp):
        return _build(tp, value, key + ".")
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return _coerce(inner, value, key)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{key}: expected a list, got {value!r}; write e.g. {key}=[a,b]")
        return [_coerce(args[0], v, key) for v in value]
    if tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return value
    return _scalar(tp, value, key)


def _scalar(tp: type, value: Any, key: str):
    if tp is float and isinstance(value, str):
        try:  # YAML 1.1 reads 2e-4 (no dot) as a string; users mean the number
            return float(value)
        except ValueError:
            pass
    ok = {
        bool: isinstance(value, bool),
        int: isinstance(value, int) and not isinstance(value, bool),
        float: isinstance(value, (int, float)) and not isinstance(value, bool),
        str: isinstance(value, str),
    }[tp]
    if not ok:
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r} ({type(value).__name__})")
    return float(value) if tp is float else value


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {fix}")


def validate(cfg: RunConfig) -> None:
    """Value checks that need no model, no files and no process group."""
    from . import methods, tracking
    from .data import TASKS
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
    _check(z.stage is None or z.stage in (0, 1, 2, 3), "zero.stage", z.stage, "ZeRO stage must be 0, 1, 2 or 3")
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
    _check(z.offload_param == "none" or z.stage in (None, 3), "zero.offload_param", z.offload_param,
           f"parameter offload needs ZeRO stage 3 (zero.stage={z.stage}); set zero.stage=3 or offload_param=none")
    _check(z.offload_optimizer == "none" or z.stage != 0, "zero.offload_optimizer", z.offload_optimizer,
           "optimizer offload needs ZeRO stage 1, 2 or 3 (zero.stage=0); set zero.stage")
    _check(z.offload_optimizer != "nvme" or z.stage in (None, 3), "zero.offload_optimizer", z.offload_optimizer,
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


def check_world(cfg: RunConfig, world_size: int) -> int:
    """Gradient-accumulation steps for this world size; the global batch stays what the config says."""
    per_step = cfg.train.micro_batch * world_size
    _check(cfg.train.batch_size % per_step == 0, "train.batch_size", cfg.train.batch_size,
           f"must be a multiple of train.micro_batch x world size = {cfg.train.micro_batch} x {world_size}; "
           f"change train.batch_size or train.micro_batch")
    return cfg.train.batch_size // per_step


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
