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
    # the qualified name of the ModuleList of transformer blocks (e.g. gpt_neox.layers), for methods that work per
    # block (adapters, prefixes, ft_top_k); None = found by name for the architectures bigadapt knows
    blocks: str | None = None


@dataclass
class MethodConfig:
    name: str = "lora"
    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    targets: list[str] = field(default_factory=lambda: ["q", "v"])  # paper names or module-name patterns
    rslora: bool = False  # scale by alpha/sqrt(r) instead of alpha/r
    # per-module rank and alpha, as peft's rank_pattern/alpha_pattern: {module-name pattern: value}; the first
    # pattern matching a module's name wins, the others keep r / alpha
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    dora: bool = False  # DoRA (Liu et al. 2024): a trained magnitude per output row, LoRA on the direction
    lora_init: str = "kaiming"  # kaiming (the paper's A) | gaussian | pissa | olora (A, B and W0's residual from W0)
    lr_ratio: float = 1.0  # LoRA+ (Hayou et al. 2024): B's learning rate = lr_ratio x A's (they suggest 16)
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
    # processes per rank that collate the next steps' batches while this one trains (data/prefetch.py);
    # None = 2 on a GPU, 0 on CPU (the ranks already use every core)
    data_workers: int | None = None
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
    # 0 | 1 | 2 | 3 (obeyed) | auto: the fastest layout the accounting predicts to fit in memory_budget
    # (bigadapt/layout.py; with no budget known, the fixed rule) | null: the fixed rule, 3 with two or more
    # ranks, else 0, whatever the memory
    stage: int | str | None = "auto"
    # bytes per device the layout must fit in (an int, or a size such as 70GiB / 80GB, GB read as GiB);
    # None = the GPU's total memory, or unknown on CPU. Used by stage auto and to size ZeRO-3's gather windows
    memory_budget: int | str | None = None
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
    _validate(cfg)
    return cfg


def config_from_dict(raw: dict) -> RunConfig:
    cfg = _build(RunConfig, raw, "")
    _validate(cfg)
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
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _coerce(inner[0], value, key)
        for a in inner:  # int | str: the first type the value is
            try:
                return _coerce(a, value, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {' or '.join(a.__name__ for a in inner)}, got {value!r} "
                          f"({type(value).__name__})")
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


def _validate(cfg: RunConfig) -> None:
    from .validation import validate  # here, not at the top: validation reads this module's constants
    validate(cfg)


def _check(ok: bool, key: str, value: Any, fix: str) -> None:
    if not ok:
        raise ConfigError(f"{key}={value!r}: {fix}")


def check_world(cfg: RunConfig, world_size: int) -> int:
    """Gradient-accumulation steps for this world size; the global batch stays what the config says."""
    per_step = cfg.train.micro_batch * world_size
    _check(cfg.train.batch_size % per_step == 0, "train.batch_size", cfg.train.batch_size,
           f"must be a multiple of train.micro_batch x world size = {cfg.train.micro_batch} x {world_size}; "
           f"change train.batch_size or train.micro_batch")
    return cfg.train.batch_size // per_step


def dump_config(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
