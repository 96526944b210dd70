"""One trainer per workdir: an exclusive lock held for the trainer's lifetime.

Two trainers on one workdir destroy each other's work: both write `N.orbax-checkpoint-tmp`
folders under the same names, both append to metrics.jsonl. So the trainer takes
`DIR/lock` before it touches anything else and a second one stops at once with
`WorkdirLockedError` (exit status 6), naming the holder.

How: `fcntl.flock` on the lock file, which the kernel releases when the holder dies however it
dies (SIGKILL included), so a crashed run never blocks its own restart. The file also records
the holder (pid, host, start time) and a heartbeat (its modification time, touched every
`HEARTBEAT_S`): that is what the error message shows, and it covers the cases flock cannot:
  * a file left by a dead holder (its content is still there) is taken over with a warning;
  * filesystems without working flock (some network or FUSE mounts: flock fails, or two hosts
    both get it): the holder is judged alive by its pid on the same host, by a fresh heartbeat
    from another host.
A clean exit empties the file (an empty lock file means "free").
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import threading
import time
from typing import Any

from flan_jax.train.exit_codes import WorkdirLockedError

LOCK_NAME = "lock"
HEARTBEAT_S = 30.0
# Another host's holder is presumed dead when its heartbeat is older than this.
STALE_AFTER_S = 4 * HEARTBEAT_S


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def _describe(owner: dict[str, Any], heartbeat_age: float | None) -> str:
    beat = f", heartbeat {heartbeat_age:.0f}s ago" if heartbeat_age is not None else ""
    return f"pid {owner.get('pid')} on host {owner.get('host')!r} (started {owner.get('started')}{beat})"


class WorkdirLock:
    """`with WorkdirLock(workdir):` holds the lock of `workdir` for the block (see the module docstring)."""

    def __init__(self, workdir: str | os.PathLike):
        self.path = os.path.join(os.fspath(workdir), LOCK_NAME)
        self._fd: int | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # ------------------------------------------------------------------ acquire / release
    def acquire(self) -> None:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            kernel_lock = self._flock(fd)
            previous, age = self._read(fd)
            if previous and not self._is_stale(previous, age, kernel_lock):
                raise WorkdirLockedError(self._locked_message(previous, age))
            if previous:
                logging.warning(
                    "Workdir lock %s was left by %s, which is no longer running: taking it over.",
                    self.path, _describe(previous, age),
                )
            self._write(fd)
        except BaseException:
            os.close(fd)
            raise
        self._fd = fd
        self._heartbeat = threading.Thread(target=self._beat, name="flan_jax-workdir-lock", daemon=True)
        self._heartbeat.start()

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        with contextlib.suppress(OSError):
            fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    # ------------------------------------------------------------------ pieces
    def _flock(self, fd: int) -> bool:
        """True when the kernel granted the lock, False where the filesystem has no working flock."""
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            previous, age = self._read(fd)
            raise WorkdirLockedError(self._locked_message(previous, age)) from None
        except OSError as error:
            if error.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                logging.warning("%s: the filesystem does not support flock (%s); judging the holder by pid/heartbeat only",
                                self.path, error)
                return False
            raise

    @staticmethod
    def _read(fd: int) -> tuple[dict[str, Any], float | None]:
        """The recorded holder ({} when free or unreadable) and the age of its heartbeat."""
        os.lseek(fd, 0, os.SEEK_SET)
        raw = os.read(fd, 1 << 16)
        if not raw.strip():
            return {}, None
        age = max(time.time() - os.fstat(fd).st_mtime, 0.0)
        try:
            return json.loads(raw), age
        except json.JSONDecodeError:
            return {"pid": None, "host": None, "started": "unknown (unreadable lock file)"}, age

    @staticmethod
    def _is_stale(owner: dict[str, Any], age: float | None, kernel_lock: bool) -> bool:
        if owner.get("host") == socket.gethostname() and isinstance(owner.get("pid"), int):
            # Same host: with the kernel's lock granted nobody holds it; without, ask the pid.
            return kernel_lock or owner["pid"] == os.getpid() or not _pid_alive(owner["pid"])
        # Another host (or an unreadable record): only a stale heartbeat proves it gone, because
        # a filesystem shared between hosts may not share flock between them.
        return age is not None and age > STALE_AFTER_S

    def _locked_message(self, owner: dict[str, Any], age: float | None) -> str:
        who = _describe(owner, age) if owner else "another process (it has not recorded itself yet)"
        return (
            f"The workdir {os.path.dirname(self.path)} is in use by another trainer: {who}. Two trainers on "
            "one workdir overwrite each other's checkpoints and logs, so this one stops. Wait for it to end, "
            f"stop it, or use another --workdir. (If that process is gone, {self.path} is stale: it is taken "
            f"over automatically on its host, or after {STALE_AFTER_S:.0f}s without a heartbeat from another host.)"
        )

    def _write(self, fd: int) -> None:
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        }
        data = (json.dumps(record) + "\n").encode()
        os.ftruncate(fd, 0)
        os.pwrite(fd, data, 0)
        os.fsync(fd)

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)
