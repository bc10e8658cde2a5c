"""bigadapt's checkpoint: trainable tensors only, world-size independent, atomic, fingerprinted.

    <run_dir>/checkpoints/step-00000100/
        adapter.safetensors    trainable tensors (fp32 masters) at full shape, gathered one at a time
        optimizer.safetensors  Adam moments `<name>.exp_avg`, `<name>.exp_avg_sq`, full shape
        state.json             step, optimizer step, samples seen, world size at save, last eval
        manifest.json          format, config, versions, base fingerprint, tensor index, file sizes + sha256

A checkpoint is written into a temporary directory, every file fsynced, then renamed into place; the
manifest is written last and lists every file's hash, so a directory is complete iff its manifest
verifies. No pickle anywhere. The base is never gathered and never written.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from . import zero
from .errors import CheckpointError, ConfigError

FORMAT = "bigadapt-checkpoint/1"
MOMENTS = ("exp_avg", "exp_avg_sq")
SAMPLED_TENSORS = 8
SAMPLE_ELEMENTS = 1024


# ---------------------------------------------------------------- base fingerprint
def fingerprint(model: torch.nn.Module, exclude: list[str] = ()) -> dict:
    """*Collective.* Architecture, shapes and a hash of a sample of the frozen base weights.

    The sample is the leading elements of a few weight matrices, rounded to bf16 before hashing so the
    same base in fp32 or bf16 matches; nothing is gathered for large tensors, and the answer is the same
    on any world size.
    """
    params = [(n.replace(".base_layer", ""), p) for n, p in model.named_parameters()
              if not any(n == x or n.startswith(x + ".") for x in exclude)]
    shapes = hashlib.sha256("\n".join(f"{n}:{list(zero.full_shape(p))}" for n, p in params).encode())
    matrices = [p for _, p in params if len(zero.full_shape(p)) >= 2]
    step = max(1, len(matrices) // SAMPLED_TENSORS)
    sample = torch.cat([zero.leading_elements(p, SAMPLE_ELEMENTS) for p in matrices[::step][:SAMPLED_TENSORS]])
    weights = hashlib.sha256(sample.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    dtypes = sorted({str(p.dtype).replace("torch.", "") for _, p in params})
    return {"model_type": getattr(model.config, "model_type", ""), "class": type(model).__name__,
            "num_params": sum(zero.full_numel(p) for _, p in params), "dtype": ",".join(dtypes),
            "shapes_sha256": shapes.hexdigest()[:16], "weights_sha256": weights.hexdigest()[:16]}


def check_fingerprint(saved: dict, current: dict, where: Path) -> None:
    for key, what in (("model_type", "architecture"), ("num_params", "parameter count"),
                      ("shapes_sha256", "parameter shapes"), ("weights_sha256", "base weights")):
        if saved.get(key) != current.get(key):
            raise CheckpointError(
                f"{where}: was trained on another base ({what} differ: saved {saved.get(key)}, "
                f"this base {current.get(key)}); load it onto the model named in its manifest.json")


# ---------------------------------------------------------------- writing
def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _write(path: Path, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def gather_trainable(model, optimizer) -> tuple[dict, dict]:
    """*Collective.* Trainable masters and Adam moments, one parameter at a time; base never touched."""
    tensors, moments = {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tensors[name] = zero.full_master(p)
        for key in MOMENTS:
            moments[f"{name}.{key}"] = zero.full_optimizer_state(optimizer, p, key)
    return tensors, moments


def save(ckpt_root: Path, step: int, model, optimizer, state: dict, manifest: dict, keep_last: int) -> Path:
    """*Collective.* Every rank gathers; rank 0 writes atomically and prunes to the newest keep_last."""
    tensors, moments = gather_trainable(model, optimizer)
    final = ckpt_root / f"step-{step:08d}"
    if zero.rank() == 0:
        _write_atomic(final, tensors, moments, state, manifest)
        prune(ckpt_root, keep_last)
    zero.barrier()
    return final


def _write_atomic(final: Path, tensors: dict, moments: dict, state: dict, manifest: dict) -> None:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {"adapter.safetensors": st_save(tensors, metadata={"format": FORMAT}),
             "optimizer.safetensors": st_save(moments, metadata={"format": FORMAT}),
             "state.json": json.dumps(state, indent=1).encode()}
    delay = float(os.environ.get("BIGADAPT_FAULT_SAVE_DELAY", "0"))  # fault injection for crash tests
    for fname, data in files.items():
        _write(tmp / fname, data)
        time.sleep(delay)
    manifest = dict(manifest, format=FORMAT, step=state["step"],
                    tensors={n: {"shape": list(t.shape), "dtype": "float32"} for n, t in tensors.items()},
                    files={f: {"bytes": len(d), "sha256": _sha256(d)} for f, d in files.items()})
    _write(tmp / "manifest.json", json.dumps(manifest, indent=1, default=str).encode())
    _fsync_dir(tmp)
    if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave a gap without it
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def prune(ckpt_root: Path, keep_last: int) -> None:
    for old in complete(ckpt_root)[:-keep_last]:
        shutil.rmtree(old, ignore_errors=True)


def clean_stale(ckpt_root: Path) -> None:
    """Remove temporary directories left by a save that was killed (they were never visible as checkpoints)."""
    for d in ckpt_root.glob(".tmp-*"):
        shutil.rmtree(d, ignore_errors=True)
    for d in ckpt_root.glob(".old-*"):
        shutil.rmtree(d, ignore_errors=True)


# ---------------------------------------------------------------- reading
def complete(ckpt_root: Path) -> list[Path]:
    """Checkpoint directories that have a manifest (renamed into place), oldest first."""
    if not ckpt_root.is_dir():
        return []
    return sorted(d for d in ckpt_root.glob("step-*") if (d / "manifest.json").is_file())


def verify(ckpt: Path) -> dict:
    """The manifest, after checking every file's size and sha256; else a one-line CheckpointError."""
    mpath = ckpt / "manifest.json"
    if not mpath.is_file():
        raise CheckpointError(f"{ckpt}: not a complete bigadapt checkpoint (no manifest.json); "
                              f"pass a step-* directory, or --resume auto")
    try:
        manifest = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupted ({e})") from None
    if manifest.get("format") != FORMAT:
        raise CheckpointError(f"{ckpt}: format {manifest.get('format')!r}, this bigadapt reads {FORMAT!r}")
    for fname, meta in manifest["files"].items():
        path = ckpt / fname
        if not path.is_file():
            raise CheckpointError(f"{path}: missing from the checkpoint")
        data = path.read_bytes()
        if len(data) != meta["bytes"]:
            raise CheckpointError(f"{path}: truncated or overwritten ({len(data)} bytes, manifest says "
                                  f"{meta['bytes']}); resume from an earlier checkpoint")
        if _sha256(data) != meta["sha256"]:
            raise CheckpointError(f"{path}: corrupted (sha256 differs from manifest.json); "
                                  f"resume from an earlier checkpoint")
    return manifest


def check_fresh_start(run_dir: Path, resume: str | None, overwrite: bool) -> None:
    """A run started without --resume must not silently replace the run already in its directory (its
    checkpoints would be pruned in favour of the new ones and its metrics history lost)."""
    if (resume and resume != "none") or overwrite:
        return
    found = sorted((run_dir / "checkpoints").glob("step-*"))
    if found:
        raise ConfigError(f"run_dir={str(run_dir)!r} already holds a run (checkpoint {found[-1].name}): continue it "
                          f"with --resume auto, write elsewhere with --set run_dir=<new dir>, or replace it with "
                          f"--overwrite")


def clear_for_overwrite(run_dir: Path) -> None:
    """--overwrite: the earlier run's checkpoints, metrics and tracker files go, so that nothing of it is resumed,
    pruned against the new run's steps or drawn into its curves. Its other files (config, estimate) are rewritten
    by the new run."""
    for folder in ("checkpoints", "tensorboard"):
        shutil.rmtree(run_dir / folder, ignore_errors=True)
    for name in ("metrics.jsonl", "wandb_id.txt", "labels.json"):
        (run_dir / name).unlink(missing_ok=True)


def find_resume(ckpt_root: Path, spec: str | None, log=print) -> Path | None:
    """`auto` -> the newest checkpoint that verifies (a damaged newer one is reported and skipped)."""
    if not spec or spec == "none":
        return None
    if spec != "auto":
        verify(Path(spec))
        return Path(spec)
    for ckpt in reversed(complete(ckpt_root)):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"skipping damaged checkpoint: {e}")
    return None


def read_tensors(ckpt: Path, fname: str) -> dict[str, torch.Tensor]:
    return st_load((ckpt / fname).read_bytes())


def check_names(manifest: dict, model, ckpt: Path) -> None:
    """Strict: the checkpoint must hold exactly this model's trainable set, at the same shapes."""
    want = {n: list(zero.full_shape(p)) for n, p in model.named_parameters() if p.requires_grad}
    have = {n: t["shape"] for n, t in manifest["tensors"].items()}
    missing, extra = sorted(set(want) - set(have)), sorted(set(have) - set(want))
    if missing or extra:
        raise CheckpointError(f"{ckpt}: its tensors do not match this model's trainable set (missing "
                              f"{missing[:3]}, unexpected {extra[:3]}); use the method config it was saved with")
    for n in want:
        if want[n] != have[n]:
            raise CheckpointError(f"{ckpt}: {n} has shape {have[n]}, this model expects {want[n]}")


def restore(ckpt: Path, model, optimizer, base_fp: dict) -> dict:
    """*Collective.* Load masters, working copies and Adam state; returns state.json."""
    manifest = verify(ckpt)
    check_fingerprint(manifest["base"], base_fp, ckpt)
    check_names(manifest, model, ckpt)
    tensors, moments = read_tensors(ckpt, "adapter.safetensors"), read_tensors(ckpt, "optimizer.safetensors")
    state = json.loads((ckpt / "state.json").read_text())
    zero.ensure_adam_state(optimizer, state["optimizer_step"])
    for name, p in model.named_parameters():
        if p.requires_grad:
            zero.set_master(p, tensors[name])
            for key in MOMENTS:
                zero.set_optimizer_state(optimizer, p, key, moments[f"{name}.{key}"])
    return state


def init_from(path: Path, model, base_fp: dict, heads: list[str]) -> Path:
    """*Collective.* Start every trainable tensor outside the task head from another run's adapter.

    The source must be on the same base (fingerprint) and hold each of those tensors at the same shape: a
    partial or reshaped start would silently be another method. The head (and the optimizer) start fresh.
    """
    runs = complete(path / "checkpoints")
    ckpt = path if (path / "manifest.json").is_file() else (runs[-1] if runs else None)
    if ckpt is None:
        raise CheckpointError(f"method.init_from={str(path)!r}: no checkpoint there; give a run directory or "
                              f"one of its checkpoints/step-N directories")
    check_fingerprint(verify(ckpt)["base"], base_fp, ckpt)
    tensors = read_tensors(ckpt, "adapter.safetensors")
    wanted = [(n, p) for n, p in model.named_parameters()
              if p.requires_grad and not any(n.startswith(h + ".") for h in heads)]
    for name, p in wanted:
        if name not in tensors:
            raise CheckpointError(f"method.init_from={str(path)!r}: {ckpt.name} has no {name} (it was trained "
                                  f"with another method or targets); start from a run of the same method")
        if tuple(tensors[name].shape) != zero.full_shape(p):
            raise CheckpointError(f"method.init_from={str(path)!r}: {name} is {tuple(tensors[name].shape)} there, "
                                  f"{zero.full_shape(p)} here; use the same method settings (r, targets)")
    for name, p in wanted:
        zero.set_master(p, tensors[name])
    return ckpt


def load_adapter(ckpt: Path, model, base_fp: dict | None = None) -> dict:
    """Single process, no DeepSpeed: put the trained tensors into an injected model; returns the manifest."""
    manifest = verify(ckpt)
    if base_fp is not None:
        check_fingerprint(manifest["base"], base_fp, ckpt)
    check_names(manifest, model, ckpt)
    tensors = read_tensors(ckpt, "adapter.safetensors")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name in tensors:
                p.copy_(tensors[name].to(p.dtype))
    return manifest
