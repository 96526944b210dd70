"""Reading gzip-compressed data files (`.jsonl.gz`, `.tsv.gz`, ...) with located errors.

Public preference and instruction datasets are usually shipped gzipped (HH-RLHF is
`*.jsonl.gz`); the file sources read them directly, so users never unpack a copy. A file cut short
(an interrupted download or copy) or a corrupt one must not turn into a silently shorter dataset:
a truncated file raises a `DataError` naming the file and the first line that could not be read,
or, when the source skips bad records, keeps its complete lines and counts the cut-off rest as one
skipped record. Concatenated gzip members (what `cat a.gz b.gz` makes) are read one after another.
"""

from __future__ import annotations

import pathlib
import zlib
from collections.abc import Callable

from flan_jax.data.errors import DataError

GZIP_SUFFIXES = (".gz",)
_GZIP_ONLY = 16 + zlib.MAX_WBITS  # wbits for gzip headers and trailers (the CRC and size are checked)


def is_gzip(path: pathlib.Path) -> bool:
    return path.suffix in GZIP_SUFFIXES


def read_bytes(path: pathlib.Path, on_truncated: Callable[[DataError], None]) -> bytes:
    """The file's bytes, decompressed when it is gzipped.

    `on_truncated(error)` is called for a file that ends inside compressed data; if it returns
    (a skipping source counts the error), the complete lines read so far are returned.
    """
    raw = path.read_bytes()
    if not is_gzip(path):
        return raw
    parts: list[bytes] = []
    member = 0
    while raw:
        decompressor = zlib.decompressobj(_GZIP_ONLY)
        try:
            parts.append(decompressor.decompress(raw))
            parts.append(decompressor.flush())
        except zlib.error as error:
            lines = b"".join(parts).count(b"\n")
            raise DataError(
                f"corrupt gzip data in member {member} ({error}); {lines} complete lines were readable before it",
                file=path,
                line=lines + 1,
            ) from None
        if not decompressor.eof:
            text = b"".join(parts)
            complete = text[: text.rfind(b"\n") + 1]
            lines = complete.count(b"\n")
            on_truncated(DataError(
                f"truncated gzip file: it ends inside compressed data after {len(text)} decompressed bytes "
                f"({lines} complete lines); was the download or copy interrupted?",
                file=path,
                line=lines + 1,
            ))
            return complete
        raw = decompressor.unused_data.lstrip(b"\0")  # padding some tools leave between members
        member += 1
    return b"".join(parts)
