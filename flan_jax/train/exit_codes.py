"""How a training run ends: one exception class and one exit status per kind of failure.

`python -m flan_jax.train` exits with these codes, so a scheduler or a wrapper script can react
to each kind (retry, alert, give up) without parsing logs:

  0  finished, or preempted by SIGTERM after a checkpoint was saved
  1  an unexpected error (a Python traceback: a bug, or something not classified below)
  2  bad command line (unknown flag or config field)
  3  non-finite loss or gradients (`train.on_nonfinite="stop"`), or `"skip"` past its limits
  4  no checkpoint of the workdir can be used: every one fails its checksums or cannot be read
  5  the config differs from the checkpoint's in a way the run cannot continue with (or, for
     fields that change the run's meaning, without `--config.train.allow_config_change=True`)
  6  the workdir is locked by another running trainer
  7  the disk (or quota) is full
  8  a checkpoint save failed (reported within one step of the failure)

Library callers get the exceptions (all `RunError`s with an `exit_code`); only the command line
turns them into exit statuses (`exit_code_for`).
"""

from __future__ import annotations

import enum
import errno


class ExitCode(enum.IntEnum):
    OK = 0
    UNEXPECTED = 1
    USAGE = 2
    NONFINITE = 3
    NO_USABLE_CHECKPOINT = 4
    CONFIG_MISMATCH = 5
    WORKDIR_LOCKED = 6
    DISK_FULL = 7
    SAVE_FAILED = 8


class RunError(RuntimeError):
    """A failure of the run the user can act on; `exit_code` is the command line's exit status."""

    exit_code = ExitCode.UNEXPECTED


class NonFiniteError(RunError):
    """The loss or gradients became NaN/inf ("stop"), or "skip" skipped more updates than allowed."""

    exit_code = ExitCode.NONFINITE


class NoUsableCheckpointError(RunError):
    """The workdir has checkpoints but none verifies and restores."""

    exit_code = ExitCode.NO_USABLE_CHECKPOINT


class ConfigMismatchError(RunError, ValueError):
    """The resumed run's config (or its frozen parameters) differs from its checkpoint's beyond what is allowed."""

    exit_code = ExitCode.CONFIG_MISMATCH


class WorkdirLockedError(RunError):
    """Another live trainer holds the workdir's lock."""

    exit_code = ExitCode.WORKDIR_LOCKED


class DiskFullError(RunError):
    exit_code = ExitCode.DISK_FULL


class CheckpointSaveError(RunError):
    """An (asynchronous) checkpoint save did not complete."""

    exit_code = ExitCode.SAVE_FAILED


_DISK_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}


def is_disk_full(error: BaseException) -> bool:
    """Whether `error` or anything in its cause/context chain is "no space left" (or quota)."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _DISK_FULL_ERRNOS:
            return True
        if "No space left on device" in str(error) or "Disk quota exceeded" in str(error):
            return True  # e.g. tensorstore's errors, which are not OSErrors
        error = error.__cause__ or error.__context__
    return False


def exit_code_for(error: BaseException) -> ExitCode:
    """The exit status for an exception that ended a run (disk full wins over the rest)."""
    if is_disk_full(error):
        return ExitCode.DISK_FULL
    if isinstance(error, RunError):
        return error.exit_code
    return ExitCode.UNEXPECTED
