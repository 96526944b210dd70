"""The launchers' opt-in re-exec with glibc's malloc tunables: off by default, they take effect when asked,
keep the pid, and the benchmarks' default-on can be turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flan_jax import host_memory

# Re-executes itself like the launchers, then mallocs 64 MiB through libc (numpy would advise huge
# pages on its own), frees it and mallocs it again, as XLA does with a step's buffers. Reports how
# much of the process sat on transparent huge pages and the page faults of the second malloc.
_CHILD = """
import ctypes, json, os, resource, sys
from flan_jax import host_memory
host_memory.reexec_with_tuned_malloc(default=sys.argv[1] == "benchmark")  # a launcher, or a benchmark
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
libc.free.argtypes = [ctypes.c_void_p]
size = 64 * 2**20
block = libc.malloc(size)
ctypes.memset(block, 1, size)
huge_kb = 0
with open("/proc/self/smaps") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge_kb += int(line.split()[1])
libc.free(block)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
ctypes.memset(libc.malloc(size), 2, size)
faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES", ""), "huge_kb": huge_kb,
                  "faults_on_reuse": faults}))
"""

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")


def _run_child(caller: str = "launcher", **env_overrides: str) -> tuple[int, dict]:
    env = host_memory.environ_without(dict(os.environ))
    env.pop("FLAN_JAX_TUNED_MALLOC", None)
    env.update(env_overrides)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD, caller], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return proc.pid, json.loads(out)


@linux_only
def test_reexec_reuses_freed_memory_puts_it_on_huge_pages_and_keeps_the_pid():
    pid, report = _run_child(GLIBC_TUNABLES="glibc.malloc.check=0", FLAN_JAX_TUNED_MALLOC="1")
    assert report["pid"] == pid  # execve: signals and exit codes still reach the caller's child
    assert report["tunables"].split(":") == ["glibc.malloc.check=0", *host_memory.TUNABLES]
    assert report["faults_on_reuse"] < 8  # the freed 64 MiB stayed mapped (re-mapped: 32 huge or 16,384 small pages)


@linux_only
def test_reexec_keeps_the_users_own_value_and_runs_once():
    _, report = _run_child("benchmark", GLIBC_TUNABLES="glibc.malloc.mmap_max=65536")
    tunables = report["tunables"].split(":")
    assert tunables[0] == "glibc.malloc.mmap_max=65536" and "glibc.malloc.mmap_max=0" not in tunables
    assert len(tunables) == len(host_memory.TUNABLES)  # the other three added once; the child exited normally
    assert report["faults_on_reuse"] >= 32  # large blocks still mapped afresh, as that user asked
    if host_memory.transparent_huge_pages_mode() != "never":
        assert report["huge_kb"] >= 32 * 1024


@linux_only
@pytest.mark.parametrize("caller,env", [("launcher", {}), ("launcher", {"FLAN_JAX_TUNED_MALLOC": "0"}),
                                        ("benchmark", {"FLAN_JAX_TUNED_MALLOC": "0"})])
def test_by_default_or_opted_out_the_process_is_left_alone(caller, env):
    """The launchers' default: library code does not rewrite its caller's process (nor its allocator)."""
    _, report = _run_child(caller, **env)
    assert not any(t in report["tunables"] for t in host_memory.TUNABLES)
    # glibc's default: the block is unmapped on free and every page faults in again.
    assert report["faults_on_reuse"] >= 32
    if host_memory.transparent_huge_pages_mode() == "madvise":  # with "always" the kernel uses huge pages regardless
        assert report["huge_kb"] < 32 * 1024  # the 64 MiB malloc stayed on 4 KiB pages


def test_requested_reads_the_opt_in():
    assert not host_memory.requested({}) and host_memory.requested({}, default=True)
    assert host_memory.requested({"FLAN_JAX_TUNED_MALLOC": "1"}) and host_memory.requested({"FLAN_JAX_TUNED_MALLOC": "true"})
    assert not host_memory.requested({"FLAN_JAX_TUNED_MALLOC": "0"}, default=True)


def test_environment_helpers_keep_other_tunables():
    tunables = ":".join(host_memory.TUNABLES)
    with_them = host_memory.environ_with({"GLIBC_TUNABLES": "a=1:b=2", "X": "y"})
    assert with_them == {"GLIBC_TUNABLES": f"a=1:b=2:{tunables}", "X": "y"}
    assert host_memory.tuned(with_them) and not host_memory.tuned({"GLIBC_TUNABLES": host_memory.HUGE_PAGES})
    assert host_memory.environ_with(with_them) == with_them  # nothing added twice
    users_own = host_memory.environ_with({"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"})
    assert users_own["GLIBC_TUNABLES"].split(":") == [  # the user's value wins, the others are added
        "glibc.malloc.arena_max=4", host_memory.HUGE_PAGES, *host_memory.REUSE_TUNABLES[1:]]
    assert host_memory.tuned(users_own)  # so the re-run process does not re-run again
    assert host_memory.environ_without(with_them) == {"GLIBC_TUNABLES": "a=1:b=2", "X": "y"}
    assert host_memory.environ_without({"GLIBC_TUNABLES": tunables}) == {}
    torch_like = host_memory.environ_without(with_them, (host_memory.HUGE_PAGES,))
    assert torch_like["GLIBC_TUNABLES"] == ":".join(["a=1", "b=2", *host_memory.REUSE_TUNABLES])
