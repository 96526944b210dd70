"""glibc malloc tuned for XLA's CPU runtime, opt-in: `FLAN_JAX_TUNED_MALLOC=1` makes the launchers re-run once with it.

Off by default: a library does not change its caller's process, and the price below (the peak
heap stays resident) is paid on GPU and TPU hosts too, where the gain is nil. CPU runs opt in with
the environment variable (`make demo` and the benchmarks do, the benchmarks for both sides).

Why: XLA's CPU runtime allocates a step's intermediates (the [tokens, vocab] logits, activations,
gradients) as one large temporary buffer afresh at every step: 758 MB for the 7M-parameter
benchmark's bf16 step. By default glibc serves every allocation above 32 MiB with a new `mmap`
and returns it with `munmap`, so every step the kernel faults in and zeroes that buffer again.
Two sets of glibc tunables fix that:

* `REUSE_TUNABLES` keep freed memory in the process, so the next step reuses the same pages:
  one malloc arena (`arena_max=1`: XLA's threads would otherwise each get an arena, and a
  thread's arena maps anything over 64 MiB afresh), no `mmap` for large blocks (`mmap_max=0`),
  and no trimming of the heap top (`trim_threshold`). Measured on the 7M benchmark: no page
  faults after the first step (713 per step before), kernel time 0.13 -> 0.004 s per step, and
  the step's spikes gone (bf16 median 0.66 -> 0.60 s, mean 0.69 -> 0.61 s). The price: the
  process keeps its peak heap, holes included (the 7M benchmark: ~2 GB, flat; the demo config's
  training with evaluations: 3.1 GB peak resident against 1.6 GB with huge pages alone), and
  with larger buffers it can keep growing: a SmolLM2-135M-shape LoRA step went 4.3 -> 8.0 GB
  resident within 25 steps on one host and to 6.1-11.5 GB on another, against 3.3 GB peak
  without the tunables (benchmarks/RESULTS.md; benchmarks/lora_memory.py measures both ways).
* `HUGE_PAGES` (`hugetlb=1`) puts large allocations on 2 MiB transparent huge pages: fewer TLB
  misses, and when memory is faulted in, 512x fewer faults. Before the reuse tunables it made
  the 7M benchmark's step 12-20% faster; with them it is still worth 3-6% in bf16.

glibc reads tunables once, at process start, so setting the variable from Python is too late:
`reexec_with_tuned_malloc()` re-executes the same command (same pid, same arguments) with them
set, before anything else has run. The launchers call it; it acts only with
`FLAN_JAX_TUNED_MALLOC=1` (`default=True`, the benchmarks' setting: unless it is `0`), and never
off Linux or when the tunables are already set. It is meant for the flan_jax launchers on CPU,
whose time is XLA's, not for every program on the machine: torch's CPU training measured slower
with the huge pages (it gains
from the reuse tunables alone, which is how the benchmark runs it), and the data loader's
pure-Python packing stage is slower with them in isolation, though the loader end to end is not
(benchmarks/RESULTS.md). Programs that use jax from their own process (a notebook, a script) get
the same by starting with `GLIBC_TUNABLES` set to `":".join(TUNABLES)`.
"""

from __future__ import annotations

import os
import sys

HUGE_PAGES = "glibc.malloc.hugetlb=1"
REUSE_TUNABLES = ("glibc.malloc.arena_max=1", "glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=1099511627776")
TUNABLES = (HUGE_PAGES, *REUSE_TUNABLES)
OPT_IN = "FLAN_JAX_TUNED_MALLOC"
_THP_SETTING = "/sys/kernel/mm/transparent_hugepage/enabled"


def _tunables(environ: dict[str, str]) -> list[str]:
    return [t for t in environ.get("GLIBC_TUNABLES", "").split(":") if t]


def _name(tunable: str) -> str:
    return tunable.split("=", 1)[0]


def tuned(environ: dict[str, str] | None = None, tunables: tuple[str, ...] = TUNABLES) -> bool:
    """Whether the environment sets each of `tunables`, to our value or the user's own."""
    names = {_name(t) for t in _tunables(os.environ if environ is None else environ)}
    return all(_name(t) in names for t in tunables)


def environ_with(environ: dict[str, str], tunables: tuple[str, ...] = TUNABLES) -> dict[str, str]:
    """A copy of `environ` whose GLIBC_TUNABLES also sets `tunables`.

    Other tunables are kept, and so is a value the user gave one of ours (say `arena_max=4`).
    """
    current = _tunables(environ)
    names = {_name(t) for t in current}
    return {**environ, "GLIBC_TUNABLES": ":".join([*current, *(t for t in tunables if _name(t) not in names)])}


def environ_without(environ: dict[str, str], tunables: tuple[str, ...] = TUNABLES) -> dict[str, str]:
    """A copy of `environ` without `tunables` (for child processes that are not XLA's)."""
    kept = [t for t in _tunables(environ) if t not in tunables]
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


def requested(environ: dict[str, str] | None = None, *, default: bool = False) -> bool:
    """Whether `FLAN_JAX_TUNED_MALLOC` asks for the tunables ("1"/"true"/"yes"; unset: `default`)."""
    value = (os.environ if environ is None else environ).get(OPT_IN, "").strip().lower()
    if not value:
        return default
    return value in ("1", "true", "yes", "on")


def reexec_with_tuned_malloc(*, default: bool = False) -> None:
    """Re-runs the current command with `TUNABLES` when requested (see above) and it changes something.

    Launchers call it with `default=False` (opt-in); the benchmarks with `default=True`. Values the
    user already set for these tunables are kept. After the re-run every tunable is set, so the
    re-run process does not run again.

    Call it first in a `__main__` block, before jax is imported: `os.execve` replaces the process
    (same pid, so signals and exit codes reach the caller as before) and never returns.
    """
    if not sys.platform.startswith("linux") or not requested(default=default) or tuned():
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], environ_with(dict(os.environ)))
