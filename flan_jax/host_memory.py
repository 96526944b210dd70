"""Large host buffers on transparent huge pages: the launchers re-run themselves once to get them.

Why: XLA's CPU runtime allocates the large intermediates of a step (the [tokens, vocab] logits,
activations, gradients) afresh at every step. glibc serves every allocation above 32 MiB with a
new `mmap`, so each step pays one page fault per 4 KiB page it touches: a 131 MB elementwise op
ran at 6 GB/s instead of 24 here. The glibc tunable `glibc.malloc.hugetlb=1` makes malloc
advise those mappings for 2 MiB transparent huge pages (512x fewer faults): that op drops from
43 to 15 ms and the 7M-parameter benchmark's train step gets 12-20% faster on CPU
(benchmarks/RESULTS.md). It changes no result, only where the bytes live.

glibc reads tunables once, at process start, so setting the variable from Python is too late:
`reexec_with_huge_pages()` re-executes the same command (same pid, same arguments) with it set,
before anything else has run. It does nothing off Linux, when the kernel has transparent huge
pages disabled, when the tunable is already set, or when `FLAN_JAX_HUGE_PAGES=0`.
(It is not a blanket win: torch's CPU training measured 15-20% slower with it here, and the data
loader's pure-Python best-fit packing stage ~2x slower in isolation, though the loader end to end,
which renders and tokenizes too, kept its speed: benchmarks/RESULTS.md, "Data pipeline". So it is
set for the flan_jax launchers, whose time is XLA's, not for every program on the machine.)
"""

from __future__ import annotations

import os
import sys

TUNABLE = "glibc.malloc.hugetlb=1"
_OPT_OUT = "FLAN_JAX_HUGE_PAGES"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def huge_pages_active(environ: dict[str, str] | None = None) -> bool:
    """Whether this process's environment carries the tunable (glibc read it at start)."""
    environ = os.environ if environ is None else environ
    return TUNABLE in environ.get("GLIBC_TUNABLES", "").split(":")


def environ_with_huge_pages(environ: dict[str, str]) -> dict[str, str]:
    """A copy of `environ` whose GLIBC_TUNABLES also holds the tunable (other tunables kept)."""
    current = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]
    return {**environ, "GLIBC_TUNABLES": ":".join([*current, TUNABLE])}


def environ_without_huge_pages(environ: dict[str, str]) -> dict[str, str]:
    """A copy of `environ` without the tunable (for child processes that are not XLA's)."""
    kept = [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t and t != TUNABLE]
    out = {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}
    if kept:
        out["GLIBC_TUNABLES"] = ":".join(kept)
    return out


def transparent_huge_pages_mode() -> str:
    """The kernel's setting: always | madvise | never ("never" where unknown or not Linux)."""
    try:
        with open(_THP_SETTING) as f:
            return f.read().split("[", 1)[1].split("]", 1)[0]
    except (OSError, IndexError):
        return "never"


def reexec_with_huge_pages() -> None:
    """Re-runs the current command with the tunable, unless it would change nothing (see above).

    Call it first in a `__main__` block, before jax is imported: `os.execve` replaces the process
    (same pid, so signals and exit codes reach the caller as before) and never returns.
    """
    if (
        not sys.platform.startswith("linux")
        or os.environ.get(_OPT_OUT, "1") == "0"
        or huge_pages_active()
        or transparent_huge_pages_mode() == "never"
    ):
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ_with_huge_pages(dict(os.environ)))
