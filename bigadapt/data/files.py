"""Reading the user's data (tasks sft, text, cls) into `datasets.Dataset` splits.

`data.path` is a single .jsonl/.json/.csv/.parquet file, a folder of per-split files, a `save_to_disk` folder
or a hub dataset name. The eval split is `data.eval_path`, else the source's validation split, else a
`data.eval_fraction` of train held out with `train.seed` (the same split on every rank and every run).

Each split gets a `__row` column (the 1-based row of the source, the line of a JSONL file) before any
shuffle or subset, so a bad value deep in a tokenizing map can still be reported as "file row N column C".
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from bigadapt.errors import DataError

from .tasks import _FILE_BUILDERS, _SPLIT_STEMS, _local, subset_indices

ROW = "__row"


@dataclass
class Split:
    rows: object  # datasets.Dataset, with a ROW column
    where: str  # how errors name it: a file path, or "<hub name> split <s>"


def _reason(e: Exception) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:160]


def read_file(path: Path) -> object:
    """One .jsonl/.json/.csv/.parquet file as a Dataset; a file that is not what its extension says is one line."""
    import datasets
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    builder = _FILE_BUILDERS.get(path.suffix)
    if builder is None:
        raise DataError(f"{path}: unknown extension; use .jsonl, .json, .csv or .parquet")
    try:
        return datasets.load_dataset(builder, data_files=str(path), split="train")
    except Exception as e:  # noqa: BLE001 - arrow/json/csv parser errors all mean "not a valid <builder> file"
        raise DataError(f"{path}: cannot be read as {builder} ({_reason(e)})") from None


def _with_rows(ds, where: str) -> Split:
    if ROW not in ds.column_names:
        ds = ds.add_column(ROW, list(range(1, len(ds) + 1)))
    if len(ds) == 0:
        raise DataError(f"{where}: no rows")
    return Split(ds, where)


def _hub_splits(name: str) -> dict:
    """The hub dataset's splits; offline (or a wrong name) is one DataError line."""
    try:
        import datasets
        return dict(datasets.load_dataset(name))
    except Exception as e:  # noqa: BLE001 - no network, no such dataset, no package: the same advice
        raise DataError(f"data.path={name!r}: not a local file or folder, and datasets.load_dataset cannot load it "
                        f"from the hub ({_reason(e)}); offline, pass a local .jsonl/.csv/.parquet file") from None


def _folder_eval(task: str, path: Path):
    """The validation split of a folder (save_to_disk or per-split files), or None when it has none."""
    import datasets
    if (path / "dataset_dict.json").is_file():
        splits = datasets.load_from_disk(str(path))
        name = next((s for s in _SPLIT_STEMS["validation"] if s in splits), None)
        return (splits[name], f"{path} split {name}") if name else None
    stems = {f.stem: f for f in path.iterdir() if f.suffix in _FILE_BUILDERS}
    name = next((s for s in _SPLIT_STEMS["validation"] if s in stems), None)
    return (read_file(stems[name]), str(stems[name])) if name else None


def _source(task: str, path_or_name: str) -> tuple[Split, Split | None]:
    """(train, the source's own validation split or None)."""
    import datasets
    path = Path(path_or_name)
    if path.is_file() or path.suffix in _FILE_BUILDERS:
        return _with_rows(read_file(path), str(path)), None
    if path.is_dir():
        if (path / "state.json").is_file():  # a single saved Dataset (save_to_disk of one split)
            return _with_rows(datasets.load_from_disk(str(path)), str(path)), None
        train = _local(task, path, "train")
        if train is None:
            raise DataError(f"data.path={path_or_name!r}: a folder without train.jsonl/.json/.csv/.parquet or a "
                            f"save_to_disk dataset; put the training rows in train.jsonl")
        where = str(path) if (path / "dataset_dict.json").is_file() else str(_split_file(path, "train"))
        found = _folder_eval(task, path)
        return _with_rows(train, where), (_with_rows(*found) if found else None)
    splits = _hub_splits(path_or_name)
    if "train" not in splits:
        raise DataError(f"data.path={path_or_name!r}: the hub dataset has splits {sorted(splits)}, no 'train'")
    val = next((s for s in _SPLIT_STEMS["validation"] if s in splits), None)
    train = _with_rows(splits["train"], f"{path_or_name} split train")
    return train, (_with_rows(splits[val], f"{path_or_name} split {val}") if val else None)


def _split_file(path: Path, split: str) -> Path:
    return next(f for f in sorted(path.iterdir()) if f.suffix in _FILE_BUILDERS and f.stem in _SPLIT_STEMS[split])


def load_splits(cfg) -> tuple[Split, Split]:
    """(train, eval) of a user-data task; train is cut by data.fraction / data.max_examples after the hold-out."""
    d, seed = cfg.data, cfg.train.seed
    train, own_eval = _source(d.task, d.path)
    if d.eval_path:
        evals = _with_rows(read_file(Path(d.eval_path)), d.eval_path)
    elif own_eval is not None:
        evals = own_eval
    else:
        train, evals = _hold_out(train, d.eval_fraction, seed)
    keep = subset_indices(len(train.rows), d.fraction, d.max_examples, seed)
    if len(keep) < len(train.rows):
        train = Split(train.rows.select(keep), train.where)
    return train, evals


def _hold_out(train: Split, fraction: float, seed: int) -> tuple[Split, Split]:
    n = len(train.rows)
    if n < 2:
        raise DataError(f"{train.where}: {n} row(s) cannot be split into train and eval; add rows or set "
                        f"data.eval_path")
    parts = train.rows.train_test_split(test_size=max(1, round(fraction * n)), seed=seed, shuffle=True)
    # back to source order: a reader comparing with the file sees the same sequence
    return (Split(parts["train"].sort(ROW), train.where),
            Split(parts["test"].sort(ROW), f"{train.where} (held-out data.eval_fraction)"))


def require_columns(split: Split, columns: dict[str, str]) -> None:
    """columns: config key -> column name; a missing one is one line naming file, column and key."""
    have = [c for c in split.rows.column_names if c != ROW]
    for key, column in columns.items():
        if column not in have:
            raise DataError(f"{split.where}: no column {column!r} (columns: {', '.join(have)}); "
                            f"set data.{key} to the right column")
