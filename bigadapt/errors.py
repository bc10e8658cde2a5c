"""Errors a user can fix. The CLI prints their message as one line and exits with EXIT_USER_ERROR."""

EXIT_USER_ERROR = 2
# A run that was asked to stop (SIGUSR1/SIGTERM), checkpointed at a step boundary and exited cleanly.
# Job scripts requeue on this code; `--resume auto` continues from that checkpoint.
EXIT_PREEMPTED = 3
# A run stopped because it diverged: a non-finite loss or gradient norm, a loss spike (train.max_loss_spike) or
# too many steps in a row skipped on overflow (train.max_skipped_steps). Nothing was saved from that state; the
# checkpoints before it are kept, and `--resume auto` continues from the newest (after a change of lr, say).
# Job scripts do not requeue on it: the same run would diverge again.
EXIT_DIVERGED = 4


class BigadaptError(Exception):
    """Base class: a mistake in what the user asked for, reported as one line."""


class ConfigError(BigadaptError):
    """A config key has a bad name, type or value."""


class DataError(BigadaptError):
    """A data file is missing, malformed or holds an out-of-range label."""


class CheckpointError(BigadaptError):
    """A checkpoint is missing, incomplete, corrupted or belongs to another base model."""


class DivergedError(BigadaptError):
    """Training diverged (see EXIT_DIVERGED); raised on every rank alike."""


class StorageError(BigadaptError):
    """The run directory cannot be written: disk full, read-only, permissions."""


class SlurmError(BigadaptError):
    """sbatch/scontrol refused a request."""
