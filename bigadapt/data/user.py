"""Tasks on the user's own data: `sft` (instructions / chats), `text` (plain LM), `cls` (classification/regression).

Files are read by files.py; rows are tokenized once, through a batched `datasets.map` cached on disk: rank 0
builds the task first while the other ranks wait at a barrier, then they build it too and find rank 0's caches
(the map's fingerprint is ours, from the source, the settings and the tokenizer, so every rank computes the
same one).
The splits stay `datasets.Dataset`s: the loop indexes `task.train[i]` and gets a dict of lists.
"""
from __future__ import annotations

from collections.abc import Callable

from bigadapt import zero
from bigadapt.errors import BigadaptError, ConfigError, DataError

from . import sft
from .chat import chat_template, encode_text
from .files import ROW, Split, load_splits, require_columns
from .tasks import task_tokenizer

ENCODING_VERSION = "1"  # bump when an encoder changes what it writes, so stale caches are not reused


# ---------------------------------------------------------------- shared pieces

def _tokenizer_id(tok) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        return backend.to_str()
    return f"{type(tok).__name__}:{getattr(tok, 'vocab_size', '')}:{getattr(tok, 'eos_token_id', '')}"


def tokenize_once(split: Split, fn: Callable, tag: str, settings: tuple, tok):
    """`split.rows.map(fn)`, batched and cached on disk under a fingerprint every rank computes alike."""
    from datasets.fingerprint import Hasher
    rows = split.rows
    fingerprint = Hasher.hash((rows._fingerprint, tag, settings, _tokenizer_id(tok), ENCODING_VERSION))
    return rows.map(fn, batched=True, remove_columns=rows.column_names, new_fingerprint=fingerprint,
                    desc=f"tokenizing {tag}")


def rank0_first(build: Callable) -> Callable:
    """Rank 0 reads, splits and tokenizes (writing the caches) while the others wait; then they run the same
    steps and find every result cached. One collective, so ranks cannot pair up the wrong ones; a user error on
    rank 0 (a bad row, a missing column) is raised on every rank with the same message, instead of leaving the
    others waiting in a barrier until the process group times out."""
    def run(cfg, vocab_size: int, tokenizer=None):
        out, failure = None, None
        if zero.rank() == 0:
            try:
                out = build(cfg, vocab_size, tokenizer)
            except BigadaptError as e:
                failure = e
        said = (type(failure).__name__, str(failure)) if failure else None
        shared = zero.all_gather_object(said)[0]  # rank 0's outcome, on every rank
        if failure is not None:
            raise failure
        if shared is not None:
            raise _USER_ERRORS.get(shared[0], BigadaptError)(shared[1])
        return out if out is not None else build(cfg, vocab_size, tokenizer)
    run.__doc__ = build.__doc__
    return run


_USER_ERRORS = {cls.__name__: cls for cls in (ConfigError, DataError, BigadaptError)}


def _check_vocab(cfg, tok, vocab_size: int) -> None:
    n = len(tok) if hasattr(tok, "__len__") else getattr(tok, "vocab_size", 0)
    if n > vocab_size:
        key = "model.tokenizer" if cfg.model.tokenizer else "model.name_or_path"
        raise ConfigError(f"{key}: the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
                          f"use the model's own tokenizer or a model with a larger vocabulary")


def _lm_tokenizer(cfg, vocab_size: int, tokenizer):
    tok = task_tokenizer(cfg, vocab_size, tokenizer)
    _check_vocab(cfg, tok, vocab_size)
    if tok.eos_token_id is None:
        raise ConfigError(f"model.tokenizer: the tokenizer has no eos token; task {cfg.data.task} needs one")
    return tok


def _total(ds, column: str) -> int:
    import pyarrow.compute as pc
    return int(pc.sum(ds.data.column(column)).as_py() or 0) if len(ds) else 0


def _summary(name: str, train, evals, source: Split, extra: str = "") -> str:
    tokens, targets = _total(train, "n_tokens"), _total(train, "n_targets")
    trunc = _total(train, "truncated") if "truncated" in train.column_names else 0
    return (f"data {name} from {source.where}: train {len(train)} examples, {tokens} tokens, {trunc} truncated "
            f"to data.seq_len, {100 * targets / max(tokens, 1):.1f}% of tokens carry loss{extra}; "
            f"eval {len(evals)} examples")


def _nonempty(ds, split: Split, fix: str):
    if len(ds) == 0:
        raise DataError(f"{split.where}: no example left after tokenizing; {fix}")
    return ds


# ---------------------------------------------------------------- sft

def _sft_encoder(cfg, tok, split: Split) -> tuple[Callable, str]:
    """The messages encoder when the messages column exists, else prompt/completion."""
    d = cfg.data
    if d.messages_column in split.rows.column_names:
        template = chat_template(tok, d)
        return sft.chat_messages(tok, template, d, split.where), f"messages:{template}"
    require_columns(split, {"prompt_column": d.prompt_column, "completion_column": d.completion_column})
    return sft.prompt_completion(tok, d, split.where), "prompt_completion"


def _check_packing(cfg) -> None:
    """Model-time half of config's check: a hub/local model's type is known only from its config file."""
    if not (cfg.data.packing and cfg.model.name_or_path):
        return
    from transformers import AutoConfig

    from bigadapt.validation import PACKING_MODEL_TYPES
    kind = AutoConfig.from_pretrained(cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code)
    if kind.model_type not in PACKING_MODEL_TYPES:
        raise ConfigError(f"data.packing=True: model_type {kind.model_type} cannot tell packed examples apart "
                          f"(verified: {', '.join(PACKING_MODEL_TYPES)}); set data.packing=false")


def _sft_split(cfg, tok, split: Split):
    fn, kind = _sft_encoder(cfg, tok, split)
    settings = (kind, cfg.data.prompt_column, cfg.data.completion_column, cfg.data.messages_column,
                cfg.data.seq_len)
    return _nonempty(tokenize_once(split, fn, "sft", settings, tok), split,
                     "every row lost its completion to truncation: raise data.seq_len")


def build_sft(cfg, vocab_size: int, tokenizer=None):
    """Causal LM on completions / assistant turns only."""
    from . import TaskData
    _check_packing(cfg)
    tok = _lm_tokenizer(cfg, vocab_size, tokenizer)
    train_split, eval_split = load_splits(cfg)
    train, evals = _sft_split(cfg, tok, train_split), _sft_split(cfg, tok, eval_split)
    dropped = len(train_split.rows) - len(train)
    extra = f", {dropped} dropped (no completion token within data.seq_len)" if dropped else ""
    summary = _summary("sft", train, evals, train_split, extra)
    if cfg.data.packing:
        train = tokenize_once(Split(train, train_split.where), sft.packer(cfg.data.seq_len), "pack",
                              (cfg.data.seq_len,), tok)
        summary += f"; packed into {len(train)} rows of <= {cfg.data.seq_len} tokens"
    return TaskData(train, evals, "causal_lm", summary=summary)


# ---------------------------------------------------------------- text

def text_blocks(tok, data_cfg, where: str) -> Callable:
    """Documents + eos, concatenated and cut into seq_len blocks (the last, shorter block of a map batch kept)."""
    col, seq, eos = data_cfg.text_column, data_cfg.seq_len, tok.eos_token_id

    def encode(batch: dict) -> dict:
        ids: list[int] = []
        for row, text in zip(batch[ROW], batch[col]):
            ids += encode_text(tok, sft._text(text, where, row, col, allow_empty=True)) + [eos]
        blocks = [ids[i:i + seq] for i in range(0, len(ids), seq)]
        blocks = [b for b in blocks if len(b) > 1]  # a 1-token block predicts nothing
        return {"input_ids": blocks, "loss_from": [0] * len(blocks), "n_tokens": [len(b) for b in blocks],
                "n_targets": [len(b) - 1 for b in blocks]}
    return encode


def build_text(cfg, vocab_size: int, tokenizer=None):
    """Plain causal LM on a text column: every token is a target."""
    from . import TaskData
    tok = _lm_tokenizer(cfg, vocab_size, tokenizer)
    train_split, eval_split = load_splits(cfg)
    out = []
    for split in (train_split, eval_split):
        require_columns(split, {"text_column": cfg.data.text_column})
        fn = text_blocks(tok, cfg.data, split.where)
        ds = tokenize_once(split, fn, "text", (cfg.data.text_column, cfg.data.seq_len), tok)
        out.append(_nonempty(ds, split, "the text column holds no tokens"))
    extra = f" ({len(train_split.rows)} documents in blocks of {cfg.data.seq_len})"
    return TaskData(out[0], out[1], "causal_lm", summary=_summary("text", out[0], out[1], train_split, extra))


# ---------------------------------------------------------------- cls

def label_names(split: Split, column: str) -> list[str] | None:
    """Class names in id order (a ClassLabel's own, else the sorted distinct values); None = regression."""
    from datasets import ClassLabel, Value
    feature = split.rows.features[column]
    if isinstance(feature, ClassLabel):
        return list(feature.names)
    if isinstance(feature, Value) and feature.dtype.startswith("float"):
        return None
    values = split.rows.unique(column)
    if None in values:
        row = split.rows[split.rows[column].index(None)][ROW]
        raise DataError(f"{split.where} row {row} column {column!r}: no label")
    return [str(v) for v in sorted(values)]


def cls_encoder(tok, data_cfg, names: list[str] | None, where: str, is_class_label: bool) -> Callable:
    """{input_ids, label}: text (+ text_pair) cut longest-first to seq_len; labels mapped through `names`."""
    a_col, b_col, y_col, seq = data_cfg.text_column, data_cfg.text_pair_column, data_cfg.label_column, \
        data_cfg.seq_len
    ids = {name: i for i, name in enumerate(names or [])}

    def label(row: int, value):
        if names is None:
            return float(value)
        key = names[value] if is_class_label and isinstance(value, int) and 0 <= value < len(names) else str(value)
        if key not in ids:
            raise DataError(f"{where} row {row} column {y_col!r}: label {value!r} is not among the training "
                            f"labels {names[:8]}; fix the row or add the label to the training data")
        return ids[key]

    def encode(batch: dict) -> dict:
        a = [sft._text(t, where, r, a_col) for r, t in zip(batch[ROW], batch[a_col])]
        b = [sft._text(t, where, r, b_col) for r, t in zip(batch[ROW], batch[b_col])] if b_col else None
        full = tok(a, b)["input_ids"]
        enc = tok(a, b, truncation=True, max_length=seq) if any(len(x) > seq for x in full) else tok(a, b)
        out = {"input_ids": [list(x) for x in enc["input_ids"]],
               "label": [label(r, y) for r, y in zip(batch[ROW], batch[y_col])],
               "n_tokens": [len(x) for x in enc["input_ids"]], "n_targets": [1] * len(a),
               "truncated": [int(len(x) > seq) for x in full]}
        if b_col and "token_type_ids" in enc:  # BERT-style models embed each token's segment
            out["token_type_ids"] = [list(x) for x in enc["token_type_ids"]]
        return out
    return encode


def _cls_columns(cfg) -> dict[str, str]:
    d = cfg.data
    cols = {"text_column": d.text_column, "label_column": d.label_column}
    return {**cols, "text_pair_column": d.text_pair_column} if d.text_pair_column else cols


def build_cls(cfg, vocab_size: int, tokenizer=None):
    """Sequence classification (string/int labels -> sorted ids) or regression (float labels)."""
    from datasets import ClassLabel

    from . import TaskData
    d = cfg.data
    tok = task_tokenizer(cfg, vocab_size, tokenizer)
    _check_vocab(cfg, tok, vocab_size)
    train_split, eval_split = load_splits(cfg)
    for split in (train_split, eval_split):
        require_columns(split, _cls_columns(cfg))
    names = label_names(train_split, d.label_column)
    num_labels = 1 if names is None else len(names)
    if cfg.model.num_labels != num_labels:
        what = "regression (float labels)" if names is None else f"{num_labels} classes {names[:8]}"
        raise ConfigError(f"model.num_labels={cfg.model.num_labels}: data.path has {what}; "
                          f"set model.num_labels={num_labels}")
    out = []
    for split in (train_split, eval_split):
        is_class_label = isinstance(split.rows.features[d.label_column], ClassLabel)
        fn = cls_encoder(tok, d, names, split.where, is_class_label)
        settings = (d.text_column, d.text_pair_column, d.label_column, d.seq_len, tuple(names or ()))
        out.append(tokenize_once(split, fn, "cls", settings, tok))
    kind = "regression" if names is None else f"{num_labels} classes"
    summary = _summary("cls", out[0], out[1], train_split, f"; {kind}")
    return TaskData(out[0], out[1], "seq_cls", num_labels, label_names=names, summary=summary)


USER_TASKS = {"sft": rank0_first(build_sft), "text": rank0_first(build_text), "cls": rank0_first(build_cls)}
