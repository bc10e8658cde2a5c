"""The paper's tasks as data modules: GLUE (RoBERTa/DeBERTa) and the NLG tasks (GPT-2, GPT-3).

Local files are read with the existing parsers (`glue.load_glue`, `e2e.load_e2e`); hub datasets go through
`datasets.load_dataset` (`HubSource`), guarded so that offline the user gets one line asking for `data.path`.

GLUE examples are `{"input_ids", "label"}` (a float for STS-B). Generation tasks are causal LM examples:
prompt = source + SEPARATOR, target = " " + reference + eos, `loss_from` = prompt length, one example per
reference (as microsoft/LoRA trains E2E). `data.fraction` / `data.max_examples` pick a deterministic,
nested subset of the training split (the first k of one seeded permutation).

The parsers import `bigadapt.data`, so they are imported here lazily (this module is imported by it).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bigadapt.errors import ConfigError, DataError

from .tokenizer import load_tokenizer

SEPARATOR = " ||"  # between source and target; the E2E files' own MR/reference delimiter
GLUE_NAMES = ("cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte")
# HF `glue` column names and validation split, for online users without local TSVs
_HF_GLUE = {
    "cola": ("sentence", None), "sst2": ("sentence", None), "mrpc": ("sentence1", "sentence2"),
    "qqp": ("question1", "question2"), "stsb": ("sentence1", "sentence2"), "mnli": ("premise", "hypothesis"),
    "qnli": ("question", "sentence"), "rte": ("sentence1", "sentence2"),
}
_HF_SPLITS = {"train": "train", "dev": "validation", "valid": "validation", "test": "test",
              "dev_matched": "validation_matched", "dev_mismatched": "validation_mismatched"}

# The Hub's parquet conversion of a repository (one folder per config, `<config>/<split>/0000.parquet`). Since
# datasets 4 a repository that is a loading script is refused on its main branch; this branch holds its data.
PARQUET = "refs/convert/parquet"


@dataclass(frozen=True)
class HubSource:
    """Where a task's rows live on the Hub: a namespaced id, its config and the revision to read."""
    repo: str
    config: str | None = None
    revision: str | None = None  # PARQUET for a loading-script repository

    def load_args(self) -> dict:
        """`datasets.load_dataset` keywords besides the path and split. The parquet conversion has no dataset
        card, so its configs are not builder configs: the config is the folder (`data_dir`) and the split comes
        from the folder under it (`dev/` is read as the validation split)."""
        if self.revision == PARQUET:
            return {"data_dir": self.config, "revision": PARQUET}
        return {"name": self.config, "revision": self.revision}


GLUE_HUB = "nyu-mll/glue"  # parquet on its main branch, one builder config per task (the bare `glue` redirects)

Pairs = list[tuple[str, list[str]]]  # (source, all its references)


# ---------------------------------------------------------------- shared pieces

def task_tokenizer(cfg, vocab_size: int, tokenizer=None):
    """The tokenizer given, else the model's own, else the byte fallback (config-built bases)."""
    if tokenizer is not None:
        return tokenizer
    return load_tokenizer(cfg.model, vocab_size, cfg.model.arch.get("eos_token_id"))


def subset_indices(n: int, fraction: float, max_examples: int, seed: int) -> list[int]:
    """Indices kept by (fraction, max_examples): the first k of one permutation seeded by `seed`.

    One permutation serves every size, so smaller subsets are nested in larger ones (10% ⊂ 30% ⊂ 50%),
    and the kept indices are returned in file order.
    """
    keep = n if fraction >= 1.0 else max(1, round(fraction * n))
    if max_examples:
        keep = min(keep, max_examples)
    if keep >= n:
        return list(range(n))
    g = torch.Generator().manual_seed(seed * 7_000_003 + 11)
    return sorted(torch.randperm(n, generator=g)[:keep].tolist())


def _subset(items: list, cfg) -> list:
    d = cfg.data
    return [items[i] for i in subset_indices(len(items), d.fraction, d.max_examples, cfg.train.seed)]


def _hub(task: str, hub: HubSource, split: str, path: str | None):
    """Rows of one split: a local copy when data.path is given (see `_local`), else `datasets.load_dataset` from
    the Hub; any failure is one DataError line (offline, the user must pass data.path)."""
    if path:
        local = _local(task, Path(path), split)
        if local is not None:
            return local
        source, kwargs = path, _local_args(hub, Path(path))
    else:
        source, kwargs = hub.repo, hub.load_args()
    try:
        import datasets
        return datasets.load_dataset(source, split=split, **kwargs)
    except Exception as e:  # noqa: BLE001 - any failure (no network, no package, bad dir) is the same advice
        reason = (str(e).splitlines() or [type(e).__name__])[0][:120]
        raise DataError(f"data.task={task}: cannot load {source!r} via datasets.load_dataset ({reason}); "
                        f"offline, pass data.path=<local copy of the dataset>") from None


def _local_args(hub: HubSource, path: Path) -> dict:
    """A local folder read like the Hub: a copy of the parquet conversion has a folder named after the config
    (read with the same `data_dir` as the Hub); a clone of a parquet repository names it as a builder config."""
    if hub.config and (path / hub.config).is_dir():
        return {"data_dir": hub.config}
    return {"name": hub.config}


_SPLIT_STEMS = {"train": ("train",), "validation": ("validation", "dev", "valid", "val"), "test": ("test",)}
_FILE_BUILDERS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}


def _local(task: str, path: Path, split: str):
    """A local copy in the hub's row layout: a `save_to_disk` DatasetDict, or a folder of per-split files
    (train/validation|dev|valid/test .json/.jsonl/.csv/.parquet). None: let load_dataset read the folder
    (a dataset script or a hub-style repository clone)."""
    import datasets
    if (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        if split not in splits:
            raise DataError(f"data.path={str(path)!r}: the saved dataset has splits {sorted(splits)}, "
                            f"not {split!r} (needed by data.task={task})")
        return splits[split]
    if not path.is_dir():
        return None
    files = [f for f in sorted(path.iterdir()) if f.suffix in _FILE_BUILDERS]
    if not files:
        return None
    mine = [f for f in files if f.stem in _SPLIT_STEMS.get(split, (split,))]
    if not mine:
        raise DataError(f"data.path={str(path)!r}: no file for split {split!r} among {[f.name for f in files]}; "
                        f"name it {_SPLIT_STEMS.get(split, (split,))[0]}.jsonl (or .json/.csv/.parquet)")
    try:
        return datasets.load_dataset(_FILE_BUILDERS[mine[0].suffix], data_files=str(mine[0]), split="train")
    except Exception as e:  # noqa: BLE001 - a malformed file: name it
        reason = (str(e).splitlines() or [type(e).__name__])[0][:160]
        raise DataError(f"{mine[0]}: cannot be read as {_FILE_BUILDERS[mine[0].suffix]} ({reason})") from None


def _check_model(cfg, task: str, objective: str, num_labels: int = 0) -> None:
    m = cfg.model
    if m.objective != objective:
        raise ConfigError(f"model.objective={m.objective!r}: task {task} needs {objective}; "
                          f"set model.objective={objective}")
    if objective == "seq_cls" and m.num_labels != num_labels:
        raise ConfigError(f"model.num_labels={m.num_labels}: task {task} has {num_labels} "
                          f"({'regression' if num_labels == 1 else 'classes'}); set model.num_labels={num_labels}")


# ---------------------------------------------------------------- GLUE

def glue_records(name: str, split: str, cfg) -> list[dict]:
    """Records {text_a, text_b, label} of one split: local TSVs when present, else the hub."""
    from . import shared_data_dir
    from .glue import glue_task, load_glue
    spec = glue_task(name)
    if cfg.data.path:
        return load_glue(name, split, _glue_root(Path(cfg.data.path), spec.folder))
    default = shared_data_dir() / "glue"
    if (default / spec.folder).is_dir():
        return load_glue(name, split, default)
    if split.startswith("test"):
        raise DataError(f"data.task=glue/{name}: split {split!r} has no labels to score")
    a, b = _HF_GLUE[name]
    rows = _hub(f"glue/{name}", HubSource(GLUE_HUB, name), _HF_SPLITS[split], None)
    return [{"text_a": r[a], "text_b": r[b] if b else None, "label": r["label"]} for r in rows]


def _glue_root(path: Path, folder: str) -> Path:
    """data.path may name the task folder (…/glue/MRPC) or the folder holding it (…/glue)."""
    if (path / folder).is_dir():
        return path
    if path.name == folder and path.is_dir():
        return path.parent
    raise DataError(f"data.path={str(path)!r}: expected a GLUE folder named {folder} (with train.tsv, dev.tsv) "
                    f"or the folder that holds it")


def glue_eval_split(name: str) -> str:
    return "dev_matched" if name == "mnli" else "dev"


def encode_glue(records: list[dict], tokenizer, seq_len: int, regression: bool) -> list[dict]:
    """Sentence pairs joined as the tokenizer joins them (`<s> a </s></s> b </s>` for RoBERTa)."""
    a = [r["text_a"] for r in records]
    b = [r["text_b"] for r in records]
    pair = bool(records) and records[0]["text_b"] is not None
    enc = tokenizer(a, b if pair else None, truncation=True, max_length=seq_len)
    out = [{"input_ids": list(x), "label": float(r["label"]) if regression else int(r["label"])}
           for x, r in zip(enc["input_ids"], records)]
    # BERT-style models embed the segment of each token (0 = first sentence, 1 = second); tokenizers of
    # models without segments (RoBERTa, GPT-2) return none
    if pair and "token_type_ids" in enc:
        for e, types in zip(out, enc["token_type_ids"]):
            e["token_type_ids"] = list(types)
    return out


def glue_builder(name: str) -> Callable:
    def build(cfg, vocab_size: int, tokenizer=None):
        from . import TaskData
        from .glue import glue_task
        spec = glue_task(name)
        _check_model(cfg, f"glue/{name}", "seq_cls", spec.num_labels)
        tok = task_tokenizer(cfg, vocab_size, tokenizer)
        regression = spec.num_labels == 1
        train = _subset(glue_records(name, "train", cfg), cfg)
        dev = glue_records(name, glue_eval_split(name), cfg)
        return TaskData(encode_glue(train, tok, cfg.data.seq_len, regression),
                        encode_glue(dev, tok, cfg.data.seq_len, regression), "seq_cls", spec.num_labels)

    build.__doc__ = f"GLUE {name}: train on train.tsv (subset per data.fraction/max_examples), evaluate on dev."
    return build


# ---------------------------------------------------------------- generation (E2E and the hub NLG tasks)

def _e2e_local(split: str, cfg) -> Pairs:
    from . import shared_data_dir
    from .e2e import group_references, load_e2e
    split = "valid" if split == "dev" else split
    return group_references(load_e2e(split, cfg.data.path or shared_data_dir() / "e2e"))


def _triples(rows) -> str:
    """DART's input as microsoft/LoRA writes it (format_converting_dart.py): `s : p : o | ...`, p lower-cased."""
    return " | ".join(f"{s} : {p.lower()} : {o}" for s, p, o in rows)


Converted = tuple[str, list[str]] | None  # (source, references), or None: the row is not part of the task


# The WebNLG test split of the `webnlg_challenge_2017` config concatenates the three test files of the challenge
# (the row's `test_category`): testdata_with_lex (all 1,862 inputs with their references: the test set),
# testdata_no_lex (the same inputs without references) and testdata_unseen_with_lex (its unseen half again).
# Train and dev rows have test_category "".
WEBNLG_TEST_FILE = "testdata_with_lex"


def _webnlg(r: dict) -> Converted:
    """A `web_nlg` row as microsoft/LoRA formats WebNLG (format_converting_webnlg.py): the modified triples as
    `s : p : o | ...` and the lexicalisations marked good (rows lacking the comment field keep every text)."""
    if r.get("test_category", "") not in ("", WEBNLG_TEST_FILE):
        return None
    triples = r["modified_triple_sets"]["mtriple_set"][0]  # `s | p | o` strings, as in the XML
    texts, comments = list(r["lex"]["text"]), list(r["lex"].get("comment") or [])
    refs = [t for t, c in zip(texts, comments + [""] * (len(texts) - len(comments))) if t and c in ("", "good")]
    return (" | ".join(" : ".join(t.split(" | ", 2)) for t in triples), refs) if refs else None


# name -> (where on the Hub, row -> (source, references) or None). The ids are the organisations' own since the
# Hub moved its canonical datasets (docs/tasks.md says how each was checked); the repositories that are loading
# scripts are read from their parquet conversion (config `default` for a script without named configs).
_HUB_NLG: dict[str, tuple[HubSource, Callable[[dict], Converted]]] = {
    "e2e_nlg": (HubSource("tuetschek/e2e_nlg", "default", PARQUET),
                lambda r: (r["meaning_representation"], [r["human_reference"]])),
    # the LoRA paper's WebNLG: the 2017 challenge (10 categories in train/dev; the test adds 5 unseen ones)
    "web_nlg": (HubSource("webnlg-challenge/web_nlg", "webnlg_challenge_2017", PARQUET), _webnlg),
    "dart": (HubSource("Yale-LILY/dart", "default", PARQUET),
             lambda r: (_triples(r["tripleset"]), list(r["annotations"]["text"]))),
    "wikisql": (HubSource("Salesforce/wikisql", "default", PARQUET),
                lambda r: (f"table: {' | '.join(r['table']['header'])} question: {r['question']}",
                           [r["sql"]["human_readable"]])),
    # Samsung/samsum (the bare `samsum`) is gone from the Hub (404 since 2025-05); this mirror keeps its splits
    # and fields as plain data files
    "samsum": (HubSource("knkarthick/samsum"), lambda r: (r["dialogue"], [r["summary"]])),
}


def _task_rows(task: str, split: str, cfg):
    """(index, row, (source, references)) of the task's rows in one split, rows outside the task skipped."""
    hub, convert = _HUB_NLG[task]
    hub_split = _HF_SPLITS.get(split, split)
    for i, row in enumerate(_hub(task, hub, hub_split, cfg.data.path)):
        try:
            pair = convert(row)
        except (KeyError, IndexError, TypeError, ValueError, AttributeError) as e:
            where = cfg.data.path or hub.repo
            raise DataError(f"data.task={task}: {where} split {hub_split!r} row {i}: missing or malformed field "
                            f"{e} (expected the {hub.repo} hub layout, see docs/tasks.md)") from None
        if pair is not None:
            yield row, pair


def generation_pairs(task: str, split: str, cfg) -> Pairs:
    """(source, references) per source, in order of first appearance; split is train | dev | test."""
    if task == "e2e":
        return _e2e_local(split, cfg)
    grouped: dict[str, list[str]] = {}
    for _, (source, refs) in _task_rows(task, split, cfg):
        grouped.setdefault(source, []).extend(refs)
    return list(grouped.items())


def source_categories(task: str, split: str, cfg) -> dict[str, str]:
    """WebNLG: source -> its DBpedia category (the rows' `category`), for Table 14's seen/unseen split.

    Seen categories are those of the training split (`bigadapt.evaluate`): for the 2017 release these are exactly
    the ten that microsoft/LoRA hard-codes as `seen` (Airport ... WrittenWork), and the rule stays right for a
    local copy of another release, where a fixed list would not."""
    if task != "web_nlg":
        return {}
    return {source: row.get("category", "") for row, (source, _) in _task_rows(task, split, cfg)}


def _encode_texts(tokenizer, texts: list[str], special: bool) -> list[list[int]]:
    if getattr(tokenizer, "is_fallback", False):
        return [tokenizer.encode(t, add_special_tokens=special) for t in texts]
    return [list(x) for x in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def encode_prompts(sources: list[str], tokenizer, seq_len: int) -> list[list[int]]:
    """Prompt ids (source + SEPARATOR), cut to seq_len - 1 so at least one target token fits."""
    return [p[:max(1, seq_len - 1)] for p in _encode_texts(tokenizer, [s + SEPARATOR for s in sources], True)]


def encode_lm(pairs: list[tuple[str, str]], tokenizer, seq_len: int) -> list[dict]:
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("model.name_or_path: the tokenizer has no eos token; generation tasks need one")
    prompts = encode_prompts([s for s, _ in pairs], tokenizer, seq_len)
    targets = _encode_texts(tokenizer, [" " + t.strip() for _, t in pairs], False)
    return [{"input_ids": (p + t + [eos])[:seq_len], "loss_from": len(p)} for p, t in zip(prompts, targets)]


def generation_builder(task: str) -> Callable:
    def build(cfg, vocab_size: int, tokenizer=None):
        from . import TaskData
        _check_model(cfg, task, "causal_lm")
        tok = task_tokenizer(cfg, vocab_size, tokenizer)
        flat = [(s, r) for s, refs in generation_pairs(task, "train", cfg) for r in refs]
        dev = [(s, r) for s, refs in generation_pairs(task, "dev", cfg) for r in refs]
        seq = cfg.data.seq_len
        return TaskData(encode_lm(_subset(flat, cfg), tok, seq), encode_lm(dev, tok, seq), "causal_lm")

    build.__doc__ = f"{task}: causal LM on prompt + reference; eval loss on the dev split, metric by generation."
    return build


TASK_BUILDERS: dict[str, Callable] = {
    **{f"glue/{name}": glue_builder(name) for name in GLUE_NAMES},
    "e2e": generation_builder("e2e"),
    **{name: generation_builder(name) for name in _HUB_NLG},
}
