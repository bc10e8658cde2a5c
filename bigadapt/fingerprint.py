"""The base fingerprint a checkpoint records, and the check that refuses any other base.

Version 2 covers the whole frozen base: every tensor's name, shape and dtype, and its values at a few dozen
fixed positions per tensor. The positions are a pure function of (name, numel) through sha256, so they are the
same in every process, on any world size and with any torch version; under ZeRO-3 each rank reads only the
positions in its own partition (`zero.sample_elements`). Values are hashed at their stored precision, so an
adapter merged into the base changes the hash wherever it moved a sampled element (every element of a LoRA
target, in general): a merged model made by any tool is another base. `bigadapt merge` also marks its output
(`config.bigadapt_merged`), which names the failure precisely and catches merges too small to move a sample.

Version 1 (no `version` field) hashed the leading 1,024 elements of 8 matrices, rounded to bf16. Checkpoints
written with it are still verified, the old way (that is the only check their manifest allows), with a note.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from . import zero
from .errors import CheckpointError

VERSION = 2
SAMPLES_PER_TENSOR = 32
MERGED_KEY = "bigadapt_merged"  # config attribute `bigadapt merge` writes into its output
V1_TENSORS, V1_ELEMENTS = 8, 1024


class Fingerprint(dict):
    """The manifest's `base` entry (a plain dict in JSON); `.legacy` holds the version-1 hashes of the same base,
    computed alongside for checkpoints written before version 2 and never written itself."""
    legacy: dict | None = None


def positions(name: str, numel: int, k: int = SAMPLES_PER_TENSOR) -> list[int]:
    """k distinct flat indices into a tensor of numel elements (all of them when numel <= k), from sha256 of
    (name, numel, i): stable across processes, platforms and library versions, unlike a torch generator."""
    if numel <= k:
        return list(range(numel))
    found: set[int] = set()
    i = 0
    while len(found) < k:
        digest = hashlib.sha256(f"{name}:{numel}:{i}".encode()).digest()
        found.add(int.from_bytes(digest[:8], "little") % numel)
        i += 1
    return sorted(found)


def base_params(model: torch.nn.Module, exclude) -> list[tuple[str, torch.Tensor]]:
    """The frozen base's parameters by their base names (a LoRA-wrapped Linear's `base_layer` dropped)."""
    return [(n.replace(".base_layer", ""), p) for n, p in model.named_parameters()
            if not any(n == x or n.startswith(x + ".") for x in exclude)]


def dtype_name(p: torch.Tensor) -> str:
    return str(p.dtype).replace("torch.", "")


def fingerprint(model: torch.nn.Module, exclude: list[str] = ()) -> Fingerprint:
    """*Collective.* Of the frozen base (everything but `exclude`, the task head): names, shapes, dtypes and the
    values at `positions` of every tensor. About 32 elements per tensor are read and one small all-reduce is made."""
    params = base_params(model, exclude)
    entries = [(n, list(zero.full_shape(p)), dtype_name(p)) for n, p in params]
    sample = zero.sample_elements([p for _, p in params], [positions(n, zero.full_numel(p)) for n, p in params])
    fp = Fingerprint(record(model, entries, sample))
    fp.legacy = _fingerprint_v1(params)
    return fp


def record(model: torch.nn.Module, entries: list[tuple[str, list[int], str]], sample: torch.Tensor) -> dict:
    """The fingerprint of a base given its (name, shape, dtype) entries and the values sampled at `positions`
    (float64, in entry order): one recipe for a live model and for a base read from its files (merge_stream)."""
    layout = "\n".join(f"{n}:{shape}:{dtype}" for n, shape, dtype in entries)
    found = {
        "version": VERSION, "model_type": getattr(model.config, "model_type", ""), "class": type(model).__name__,
        "num_params": sum(int(torch.Size(shape).numel()) for _, shape, _ in entries),
        "dtype": ",".join(sorted({dtype for _, _, dtype in entries})),
        "layout_sha256": hashlib.sha256(layout.encode()).hexdigest()[:16],
        "weights_sha256": hashlib.sha256(sample.numpy().tobytes()).hexdigest()[:16],
        "sampled_elements": int(sample.numel()),
    }
    merged = getattr(model.config, MERGED_KEY, None)
    if merged:
        found["merged_from"] = merged
    return found


def _fingerprint_v1(params) -> dict:
    """*Collective.* The version-1 hashes (leading elements of a few matrices, bf16), to verify old checkpoints."""
    shapes = hashlib.sha256("\n".join(f"{n}:{list(zero.full_shape(p))}" for n, p in params).encode())
    matrices = [p for _, p in params if len(zero.full_shape(p)) >= 2]
    step = max(1, len(matrices) // V1_TENSORS)
    chosen = matrices[::step][:V1_TENSORS]
    sample = torch.cat([zero.leading_elements(p, V1_ELEMENTS) for p in chosen]) if chosen else torch.zeros(0)
    weights = hashlib.sha256(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return {"num_params": sum(zero.full_numel(p) for _, p in params),
            "shapes_sha256": shapes.hexdigest()[:16], "weights_sha256": weights.hexdigest()[:16]}


def check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    """Refuse (one-line CheckpointError) a base other than the one the checkpoint was trained on."""
    version = saved.get("version", 1)
    if version == 1:
        _check_v1(saved, current, where)
        return
    if version > VERSION:
        raise CheckpointError(f"{where}: its base fingerprint is version {version}, this bigadapt reads up to "
                              f"{VERSION}; upgrade bigadapt")
    _check_merged(saved, current, where)
    for key, what in (("model_type", "architecture"), ("dtype", "dtypes"), ("num_params", "parameter count"),
                      ("layout_sha256", "parameter names, shapes or dtypes"), ("weights_sha256", "base weights")):
        if saved.get(key) != current.get(key):
            fix = f"set model.dtype to the run's ({saved.get(key)})" if key == "dtype" else \
                "load it onto the model named in its manifest.json (a model with an adapter merged in is another base)"
            raise CheckpointError(f"{where}: was trained on another base ({what} differ: saved {saved.get(key)}, "
                                  f"this base {current.get(key)}); {fix}")


def _check_merged(saved: dict, current: dict, where: Path) -> None:
    merged = current.get("merged_from")
    if merged and merged != saved.get("merged_from"):
        raise CheckpointError(
            f"{where}: this base is the output of `bigadapt merge` (step {merged.get('step')} of a run on base "
            f"{merged.get('base_weights_sha256')}): an adapter is already in its weights; load this checkpoint onto "
            f"the base it was trained on, or use the merged model as it is")


def _check_v1(saved: dict, current: dict, where: Path) -> None:
    from . import display
    legacy = getattr(current, "legacy", None)
    if not legacy:
        raise CheckpointError(f"{where}: written with the version-1 base fingerprint, which this check cannot "
                              f"compare; load it through bigadapt's own commands")
    for key, what in (("num_params", "parameter count"), ("shapes_sha256", "parameter shapes"),
                      ("weights_sha256", "base weights")):
        if saved.get(key) != legacy.get(key):
            raise CheckpointError(f"{where}: was trained on another base ({what} differ: saved {saved.get(key)}, "
                                  f"this base {legacy.get(key)}); load it onto the model named in its manifest.json")
    if saved.get("model_type") != current.get("model_type"):
        raise CheckpointError(f"{where}: was trained on another base (architecture differ: saved "
                              f"{saved.get('model_type')}, this base {current.get('model_type')})")
    display.log(f"{where}: base verified with the version-1 fingerprint (8 tensors sampled); a checkpoint saved by "
                f"this bigadapt (e.g. --resume auto, then a save) records the full one")
