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

from . import peft_import, zero
from .errors import CheckpointError, ConfigError, DivergedError, StorageError
from .fingerprint import check_fingerprint, fingerprint  # noqa: F401 (callers use checkpoint.fingerprint)

FORMAT = "bigadapt-checkpoint/1"
MOMENTS = ("exp_avg", "exp_avg_sq")


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
    zero.link_fp32_copies(optimizer)  # bf16/fp16 at stage 0: masters and moments live on fp32 copies
    tensors, moments = {}, {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        tensors[name] = zero.full_master(p)
        for key in MOMENTS:
            moments[f"{name}.{key}"] = zero.full_optimizer_state(optimizer, p, key)
    return tensors, moments


def save(ckpt_root: Path, step: int, model, optimizer, state: dict, manifest: dict, keep_last: int) -> Path:
    """*Collective.* Every rank gathers; rank 0 writes atomically and prunes to the newest keep_last.

    Refused on every rank alike (the gathered tensors are the same everywhere): a non-finite tensor
    (DivergedError: a diverged state never displaces a good checkpoint) or a write that failed on rank 0
    (StorageError: disk full, permissions; the previous checkpoints are left as they were)."""
    tensors, moments = gather_trainable(model, optimizer)
    _check_finite(step, {**tensors, **moments})
    final = ckpt_root / f"step-{step:08d}"
    failure = None
    if zero.rank() == 0:
        try:
            _write_atomic(final, tensors, moments, state, manifest)
            prune(ckpt_root, keep_last)
        except OSError as e:
            failure = (f"{e.filename or final}: cannot write checkpoint {final.name} ({e.strerror}); the "
                       f"checkpoints before it are intact: free space or fix permissions, then --resume auto")
    failure = zero.all_gather_object(failure)[0]  # rank 0's outcome, and the barrier every rank waits at
    if failure:
        raise StorageError(failure)
    return final


def _check_finite(step: int, tensors: dict) -> None:
    for name, t in tensors.items():
        if not torch.isfinite(t).all():
            raise DivergedError(f"step {step}: {name} is not finite, so it was not checkpointed; the newest "
                                f"checkpoint is the last good one (lower train.lr, then --resume auto)")


def _write_atomic(final: Path, tensors: dict, moments: dict, state: dict, manifest: dict) -> None:
    root = final.parent
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        _fill(tmp, tensors, moments, state, manifest)
    except BaseException:  # disk full, or a kill signal turned into an exception: no half-written debris
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if final.exists():  # re-saving a step (e.g. after a resume): swap, never leave a gap without it
        old = root / f".old-{final.name}-{os.getpid()}"
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)


def _fill(tmp: Path, tensors: dict, moments: dict, state: dict, manifest: dict) -> None:
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


def prune(ckpt_root: Path, keep_last: int) -> None:
    """Remove all but the newest keep_last complete checkpoints. Each is first renamed out of the step-* names,
    so a kill during the removal leaves `.old-*` debris (cleared at the next start), never a step-* directory
    that is neither complete nor ever removed."""
    for old in complete(ckpt_root)[:-keep_last]:
        _discard(old)


def _discard(path: Path) -> None:
    doomed = path.with_name(f".old-{path.name}-{os.getpid()}")
    os.replace(path, doomed)
    shutil.rmtree(doomed, ignore_errors=True)


def clean_stale(ckpt_root: Path) -> None:
    """Remove what a killed save or prune left: temporary directories (never visible as checkpoints) and step-*
    directories without a manifest. A checkpoint appears under its step-* name only by a rename after its
    manifest was written, so one without a manifest is the remains of a removal (or a copy a user broke):
    nothing can resume from it, and left there it would be taken for a run forever."""
    for d in [*ckpt_root.glob(".tmp-*"), *ckpt_root.glob(".old-*")]:
        shutil.rmtree(d, ignore_errors=True)
    for d in ckpt_root.glob("step-*"):
        if d.is_dir() and not (d / "manifest.json").is_file():
            _discard(d)


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
        manifest = json.loads(mpath.read_text(errors="replace"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{mpath}: corrupted ({e})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{ckpt}: format {found!r}, this bigadapt reads {FORMAT!r}")
    _check_manifest_shape(manifest, mpath)
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


# What readers index without checking: a manifest of another shape (valid JSON, hand-edited, another tool's) is
# damaged like a truncated one, not a KeyError
REQUIRED_FILES = ("adapter.safetensors", "optimizer.safetensors", "state.json")


def _check_manifest_shape(manifest: dict, mpath: Path) -> None:
    files, tensors = manifest.get("files"), manifest.get("tensors")
    ok = (isinstance(files, dict) and isinstance(tensors, dict) and isinstance(manifest.get("base"), dict)
          and all(f in files for f in REQUIRED_FILES)
          and all(isinstance(m, dict) and isinstance(m.get("bytes"), int) and isinstance(m.get("sha256"), str)
                  for m in files.values())
          and all(isinstance(t, dict) and isinstance(t.get("shape"), list) for t in tensors.values()))
    if not ok:
        raise CheckpointError(f"{mpath}: not the manifest bigadapt writes (fields missing or of the wrong type); "
                              f"resume from an earlier checkpoint")


def find_resume(ckpt_root: Path, spec: str | None, log=print) -> Path | None:
    """`auto` -> the newest checkpoint that verifies (a damaged newer one is reported and skipped); None when there
    is none yet (a first start). Checkpoints that are all damaged are an error: starting over from step 0 would
    silently throw the run away."""
    if not spec or spec == "none":
        return None
    if spec != "auto":
        verify(Path(spec))
        return Path(spec)
    found = complete(ckpt_root)  # a step-* without a manifest is debris of a removal (clean_stale), not a run
    for ckpt in reversed(found):
        try:
            verify(ckpt)
            return ckpt
        except CheckpointError as e:
            log(f"skipping damaged checkpoint: {e}")
    if found:
        raise CheckpointError(f"{ckpt_root}: none of its {len(found)} checkpoint(s) is intact (newest "
                              f"{found[-1].name}); restore one from a backup, or start over with --overwrite")
    return None


def read_tensors(ckpt: Path, fname: str) -> dict[str, torch.Tensor]:
    """A safetensors file, or a one-line CheckpointError naming it (truncated, garbage, not safetensors)."""
    from safetensors import SafetensorError
    path = ckpt / fname
    try:
        return st_load(path.read_bytes())
    except (SafetensorError, OSError) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


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
    zero.ensure_adam_state(optimizer, state["optimizer_step"])  # Adam's own count: skipped steps excluded
    zero.set_loss_scale_state(optimizer, state.get("loss_scale", {}))  # fp16: where the scale search stood
    for name, p in model.named_parameters():
        if p.requires_grad:
            zero.set_master(p, tensors[name])
            for key in MOMENTS:
                zero.set_optimizer_state(optimizer, p, key, moments[f"{name}.{key}"])
    return state


def init_from(path: Path, model, base_fp: dict, heads: list[str], cfg=None) -> Path:
    """*Collective.* Start every trainable tensor outside the task head from another run's adapter, or from a peft
    LoRA adapter directory (bigadapt/peft_import.py).

    The source must be on the same base (fingerprint; a peft adapter has none: its shapes and recorded base id are
    checked) and hold each of those tensors at the same shape: a partial or reshaped start would silently be another
    method. The head (and the optimizer) start fresh. `check_init_from` ran all of this but the fingerprint on the
    meta model before the run directory was touched.
    """
    if peft_import.is_peft(path):
        tensors, ckpt = peft_import.convert(path, model, cfg, None), path
    else:
        ckpt = _init_source(path)
        check_fingerprint(verify(ckpt)["base"], base_fp, ckpt)
        tensors = read_tensors(ckpt, "adapter.safetensors")
    wanted = _init_wanted(model, heads)
    _check_init_tensors(path, ckpt, {n: tuple(t.shape) for n, t in tensors.items()}, wanted)
    for name, p in wanted.items():  # model order: the same collectives on every rank
        zero.set_master(p, tensors[name])
    return ckpt


def check_init_from(cfg, resume: str | None, overwrite: bool) -> None:
    """Pre-flight, before any process group or file: `method.init_from` names a bigadapt checkpoint or a peft LoRA
    adapter that this run's method (built on the meta device) can start from, or one ConfigError line says what
    differs. Skipped when the run resumes a checkpoint of its own (init_from is then ignored)."""
    if not cfg.method.init_from:
        return
    resuming = resume and resume != "none" and not overwrite
    if resuming and (resume != "auto" or complete(Path(cfg.run_dir) / "checkpoints")):
        return
    from . import accounting, methods, targets
    from .methods.lora_init import FROM_W0
    path = Path(cfg.method.init_from)
    model = accounting.build_meta(cfg.model)
    methods.apply(model, cfg)
    if peft_import.is_peft(path):
        peft_import.convert(path, model, cfg, None)
        return
    try:
        ckpt = _init_source(path)
        manifest = verify(ckpt)
    except CheckpointError as e:
        raise ConfigError(str(e)) from None
    _check_init_tensors(path, ckpt, {n: tuple(t["shape"]) for n, t in manifest["tensors"].items()},
                        _init_wanted(model, targets.head_prefixes(model)), error=ConfigError)
    theirs = manifest.get("config", {}).get("method", {}).get("lora_init", "kaiming")
    if theirs != cfg.method.lora_init and {theirs, cfg.method.lora_init} & set(FROM_W0):
        raise ConfigError(f"method.init_from={str(path)!r}: that run trained on the base that lora_init={theirs} "
                          f"leaves; the config says method.lora_init={cfg.method.lora_init} — set it to {theirs}")


def _init_source(path: Path) -> Path:
    runs = complete(path / "checkpoints")
    ckpt = path if (path / "manifest.json").is_file() else (runs[-1] if runs else None)
    if ckpt is None:
        raise CheckpointError(f"method.init_from={str(path)!r}: no checkpoint there; give a run directory, one of its "
                              f"checkpoints/step-N directories, or a peft adapter directory (adapter_config.json)")
    return ckpt


def _init_wanted(model, heads: list[str]) -> dict:
    return {n: p for n, p in model.named_parameters()
            if p.requires_grad and not any(n.startswith(h + ".") for h in heads)}


def _check_init_tensors(path: Path, ckpt: Path, shapes: dict, wanted: dict, error=CheckpointError) -> None:
    for name, p in wanted.items():
        if name not in shapes:
            raise error(f"method.init_from={str(path)!r}: {ckpt.name} has no {name} (it was trained with another "
                        f"method or targets); start from a run of the same method")
        if shapes[name] != zero.full_shape(p):
            raise error(f"method.init_from={str(path)!r}: {name} is {shapes[name]} there, {zero.full_shape(p)} "
                        f"here; use the same method settings (r, targets)")


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
