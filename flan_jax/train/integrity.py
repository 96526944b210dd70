"""Checksums of every file of a checkpoint, written once Orbax finalized it and verified on restore.

Orbax's rename-on-finalize protects against a save cut short, not against a finished checkpoint
whose bytes change later (disk or memory errors, a copy gone wrong, a stray write): a few
flipped bits in a params file restore without complaint and silently change the run, a flipped
exponent restores NaNs. So after each save completes the trainer writes `CHECKSUMS` into the step
folder: size and digest of every file Orbax wrote (arrays, metadata, data iterator, config), and
before using a checkpoint it recomputes them. A mismatch is corruption, handled like an
unreadable checkpoint (moved aside, the previous one used).

A checkpoint without the file (written by an older flan_jax, or a crash between Orbax's finalize
and this write) is "unverified": it is still restored, with a warning, but never named as the
last good checkpoint.

Cost: one read of the checkpoint's files (just written, so from the page cache) and SHA-256 over
them, in parallel threads; benchmarks/RESULTS.md ("checkpoint checksums") measures it against the
save and restore times.
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import os
from typing import Literal

from flan_jax import atomic_write

MANIFEST = "CHECKSUMS"
ALGORITHM = "sha256"
_CHUNK = 8 << 20
_THREADS = 4  # hashlib releases the GIL on large buffers: files hash in parallel

Status = Literal["verified", "unverified"]


class ChecksumMismatchError(ValueError):
    """A checkpoint's files differ from the checksums written when it was saved."""

    def __init__(self, directory: str, problems: list[str]):
        self.directory, self.problems = directory, problems
        shown = "; ".join(problems[:5]) + (f"; ... ({len(problems)} files)" if len(problems) > 5 else "")
        super().__init__(f"{directory}: checksum mismatch, the checkpoint is corrupt: {shown}")


def _files(directory: str) -> list[str]:
    """Every file under `directory` (relative paths, sorted), without the manifest and temporaries."""
    out = []
    for root, _, names in os.walk(directory):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), directory)
            if rel == MANIFEST or name.startswith(f".{MANIFEST}"):
                continue
            out.append(rel)
    return sorted(out)


def file_digest(path: str) -> str:
    digest = hashlib.new(ALGORITHM)
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _digests(directory: str, names: list[str]) -> dict[str, dict]:
    def one(name):
        path = os.path.join(directory, name)
        return name, {"size": os.path.getsize(path), "digest": file_digest(path)}

    with concurrent.futures.ThreadPoolExecutor(_THREADS) as pool:
        return dict(pool.map(one, names))


def write_manifest(directory: str | os.PathLike) -> None:
    """Records the checksums of the finished checkpoint in `directory` (atomically)."""
    directory = os.fspath(directory)
    manifest = {"algorithm": ALGORITHM, "files": _digests(directory, _files(directory))}
    atomic_write.write_text(os.path.join(directory, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def has_manifest(directory: str | os.PathLike) -> bool:
    return os.path.isfile(os.path.join(os.fspath(directory), MANIFEST))


def verify(directory: str | os.PathLike) -> Status:
    """"verified", "unverified" (no manifest), or raises ChecksumMismatchError naming the files."""
    directory = os.fspath(directory)
    path = os.path.join(directory, MANIFEST)
    if not os.path.isfile(path):
        return "unverified"
    try:
        manifest = json.loads(open(path).read())
        expected = manifest["files"]
        if manifest.get("algorithm") != ALGORITHM:
            raise ChecksumMismatchError(directory, [f"{MANIFEST} uses {manifest.get('algorithm')!r}, expected {ALGORITHM!r}"])
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, ChecksumMismatchError):
            raise
        raise ChecksumMismatchError(directory, [f"{MANIFEST} is unreadable ({error})"]) from error
    problems = []
    present = [name for name in expected if os.path.isfile(os.path.join(directory, name))]
    problems += [f"{name} is missing" for name in expected if name not in present]
    sized = []
    for name in present:
        size = os.path.getsize(os.path.join(directory, name))
        if size != expected[name]["size"]:
            problems.append(f"{name} has {size} bytes, {expected[name]['size']} when saved")
        else:
            sized.append(name)
    for name, got in _digests(directory, sized).items():
        if got["digest"] != expected[name]["digest"]:
            problems.append(f"{name} has changed ({ALGORITHM} {got['digest'][:12]}..., {expected[name]['digest'][:12]}... when saved)")
    if problems:
        raise ChecksumMismatchError(directory, problems)
    return "verified"

