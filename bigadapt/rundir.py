"""A run directory belongs to one run: an exclusive lock for the run's life, no fresh start over a run that is
there, and a resume that keeps the math of the run it continues.

Order of a start (bigadapt.train.run): claim the lock -> every check that can refuse the run -> first write.
"""
from __future__ import annotations

import errno
import fcntl
import json
import os
import shutil
import socket
from pathlib import Path

from . import display, zero
from .config import RunConfig
from .errors import ConfigError

LOCK = ".lock"

# Keys that may differ between a checkpoint and the run resuming it: they change when and where things are
# written, how the work is laid out over ranks, or how long the run goes on, never the result of a step.
# Everything else (lr, schedule, warmup, batch_size, seed, clip, the method and its keys, targets, data, model)
# defines the optimisation, and a change is refused unless named in --allow-config-change.
# - train.micro_batch and zero.*: the global batch and its loss normalisation are fixed by batch_size, as on
#   another world size (invariant 4); only the fp32 summation order changes.
# - train.max_steps / epochs: extending a run is normal; a decaying schedule then follows the new length.
# - method.init_from: read at a fresh start only; a resume loads its own checkpoint.
# - the divergence guards (train.max_loss_spike, max_skipped_steps) stop a run; they never change a step.
# - activation checkpointing and the attention implementation change memory and speed, not the function computed
#   (equal losses to fp32 rounding).
FREE_KEYS = ("run_dir", "train.eval_every", "train.save_every", "train.log_every", "train.keep_last",
             "train.track", "train.wandb_project", "train.max_steps", "train.epochs", "train.time_budget_s",
             "train.eval_at_s", "train.micro_batch", "method.init_from", "zero", "train.max_loss_spike",
             "train.max_skipped_steps", "train.activation_checkpointing", "train.checkpoint_every",
             "train.checkpoint_reentrant", "model.attn_implementation", "train.data_workers")


# ---------------------------------------------------------------- the lock
class RunLock:
    """flock on run_dir/.lock, held by global rank 0 for the run's life (one holder for all nodes: they share
    the directory). The kernel drops it when the holder dies, so a lock is never stale; the pid/host written
    into the file only name the holder in a refusal, and tell a clean release (file removed) from a crash."""

    def __init__(self, run_dir: Path):
        self.path, self.fd, self.made_dir = run_dir / LOCK, None, False

    def acquire(self) -> None:
        if not self.path.parent.exists():
            self.made_dir = True  # released on a refusal: a refused run leaves no directory behind
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise ConfigError(f"run_dir={str(self.path.parent)!r}: cannot be created ({e.strerror}); "
                              f"choose a writable path") from None
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            if not self._lock(fd):
                holder = _read_holder(self.path)
                os.close(fd)
                raise ConfigError(f"run_dir={str(self.path.parent)!r} is in use by another run (pid "
                                  f"{holder.get('pid', '?')} on {holder.get('host', '?')}); wait for it, stop it, "
                                  f"or use another --set run_dir=...")
            # the file may have been unlinked by a releasing holder between our open and our lock: retry on
            # the new file, or two runs would each hold a lock on a different inode
            if os.path.exists(self.path) and os.fstat(fd).st_ino == os.stat(self.path).st_ino:
                self.fd = fd
            else:
                os.close(fd)
        self._stamp()

    def _lock(self, fd: int) -> bool:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            return False
        except OSError as e:  # a file system without locks (Lustre without -o flock, NFS with nolock)
            if e.errno not in (errno.ENOLCK, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
                raise
            display.log(f"warning: {self.path}: this file system does not support locks ({e.strerror}); "
                        f"nothing stops a second run on this directory")
            return True

    def _stamp(self) -> None:
        before = _read_holder(self.path)
        if before.get("pid"):  # a clean release removes the file: this one's holder died
            display.log(f"taking over the lock of an ended run (pid {before['pid']} on {before.get('host')})")
        me = json.dumps({"pid": os.getpid(), "host": socket.gethostname()}).encode()
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, me, 0)

    def release(self, refused: bool = False) -> None:
        """Remove the file while still holding it (a run waiting on the old file retries on a new one, see
        acquire), then unlock. A refused run that made the directory removes it again."""
        if self.fd is None:
            return
        self.path.unlink(missing_ok=True)
        os.close(self.fd)  # closing the last descriptor releases the flock
        self.fd = None
        if refused and self.made_dir:
            _rmdir_if_empty(self.path.parent)


def _read_holder(path: Path) -> dict:
    try:
        holder = json.loads(path.read_text() or "{}")
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


def _rmdir_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def claim(run_dir: Path) -> RunLock | None:
    """*Collective.* Rank 0 takes the lock; a refusal is raised on every rank (the others stay quiet: ConfigError
    is printed by rank 0 only), so no rank goes on to collectives the others never reach."""
    lock, message = None, None
    if zero.rank() == 0:
        lock = RunLock(run_dir)
        try:
            lock.acquire()
        except ConfigError as e:
            message = str(e)
    message = zero.all_gather_object(message)[0]
    if message:
        raise ConfigError(message)
    return lock


# ---------------------------------------------------------------- fresh start and overwrite
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


# ---------------------------------------------------------------- resume keeps the math
def flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        out.update(flatten(v, key + ".") if isinstance(v, dict) and k != "arch" else {key: v})
    return out


def _covered(key: str, names) -> bool:
    return any(key == n or key.startswith(n + ".") for n in names)


def parse_allowed(spec: str | None) -> list[str]:
    """--allow-config-change train.lr,method: dotted keys or whole sections; a typo is an error, not a no-op."""
    names = [s.strip() for s in (spec or "").split(",") if s.strip()]
    known = flatten(RunConfig().to_dict())
    for n in names:
        if not any(_covered(k, [n]) for k in known):
            raise ConfigError(f"--allow-config-change: {n!r} is not a config key; name keys as in the YAML, "
                              f"dotted (train.lr, method.r) or a whole section (data)")
    return names


def config_changes(saved: dict, current: dict) -> dict[str, tuple]:
    """Keys whose value differs: {key: (saved, current)}. A key an older bigadapt did not write counts as its
    default."""
    defaults = flatten(RunConfig().to_dict())
    old, new = flatten(saved), flatten(current)
    return {k: (old.get(k, defaults.get(k)), new.get(k, defaults.get(k)))
            for k in sorted(set(old) | set(new)) if old.get(k, defaults.get(k)) != new.get(k, defaults.get(k))}


def check_resume_config(ckpt: Path, manifest: dict, cfg: RunConfig, allowed: list[str]) -> dict[str, tuple]:
    """Refuse a resume whose config changes the math of the run it continues; returns every change (for the
    manifest's record)."""
    changes = config_changes(manifest.get("config") or {}, cfg.to_dict())
    refused = [k for k in changes if not _covered(k, FREE_KEYS) and not _covered(k, allowed)]
    if refused:
        shown = ", ".join(f"{k} ({changes[k][0]!r} -> {changes[k][1]!r})" for k in refused)
        raise ConfigError(f"--resume {ckpt}: the config changes what the run computes: {shown}; resume with the "
                          f"checkpoint's values, start a new run_dir, or accept with --allow-config-change "
                          f"{','.join(refused)}")
    return changes
