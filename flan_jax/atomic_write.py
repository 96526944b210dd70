"""Whole-file writes that a crash can never leave half done: temporary file, fsync, rename.

A run rewrites small files it owns (metrics.jsonl on resume, config.json, the checksum manifest
of a checkpoint, evaluation results). Written in place, a kill in the middle leaves a truncated
or empty file and the old content is gone. Here the new content goes to a temporary file in the
same folder, is flushed to disk (`fsync`), then renamed over the target (`os.replace`, atomic on
POSIX), and the folder is fsynced so the rename itself survives a power cut. Readers see the old
file or the new one, never a mix.

    atomic_write.write_text(path, text)
    with atomic_write.replacing(path) as tmp:      # for writers that want a file name
        sentencepiece_trainer(model_prefix=tmp ...)

Temporary files are named `.<name>.tmp-<pid>-<random>`; `remove_stale_temporaries(folder)`
deletes those a killed process left behind (the trainer calls it at start, under its lock).

Fault injection for tests: with `FLAN_JAX_TEST_KILL_MID_WRITE=<file name>` in the environment, a
write of a file of that name stops after half of its bytes are on disk and the process SIGKILLs
itself, as a crash at the worst moment would.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
from collections.abc import Iterator

TEST_KILL_ENV = "FLAN_JAX_TEST_KILL_MID_WRITE"
_TMP_MARK = ".tmp-"


def _temporary_path(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    folder, name = os.path.split(path)
    return os.path.join(folder, f".{name}{_TMP_MARK}{os.getpid()}-{secrets.token_hex(4)}")


def fsync_folder(folder: str | os.PathLike) -> None:
    """Makes a rename or a new file inside `folder` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(os.fspath(folder) or ".", os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Replaces `path` with `data` atomically (see the module docstring)."""
    with replacing(path) as tmp:
        with open(tmp, "wb") as f:
            if os.environ.get(TEST_KILL_ENV) == os.path.basename(os.fspath(path)):
                f.write(data[: len(data) // 2])
                f.flush()
                os.fsync(f.fileno())
                os.kill(os.getpid(), signal.SIGKILL)
            f.write(data)


def write_text(path: str | os.PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yields a temporary path to write; on success it is fsynced and renamed to `path`.

    On an exception the temporary file is removed and `path` is left as it was.
    """
    tmp = _temporary_path(path)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise
    fsync_folder(os.path.dirname(os.fspath(path)))


def remove_stale_temporaries(folder: str | os.PathLike) -> list[str]:
    """Deletes the temporary files of killed writers in `folder` (not recursive); returns their names."""
    removed = []
    try:
        names = os.listdir(folder)
    except FileNotFoundError:
        return removed
    for name in names:
        if name.startswith(".") and _TMP_MARK in name:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(folder, name))
                removed.append(name)
    return removed
