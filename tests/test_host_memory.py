"""The launchers' re-exec with glibc's huge-page tunable: it takes effect, keeps the pid, can be turned off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from flan_jax import host_memory

# Re-executes itself like the launchers, then mallocs 64 MiB through libc (numpy would advise huge
# pages on its own) and reports how much of the process sits on transparent huge pages.
_CHILD = """
import ctypes, json, os
from flan_jax import host_memory
host_memory.reexec_with_huge_pages()
libc = ctypes.CDLL(None)
libc.malloc.restype = ctypes.c_void_p
size = 64 * 2**20
ctypes.memset(libc.malloc(size), 1, size)
huge_kb = 0
with open("/proc/self/smaps") as f:
    for line in f:
        if line.startswith("AnonHugePages:"):
            huge_kb += int(line.split()[1])
print(json.dumps({"pid": os.getpid(), "tunables": os.environ.get("GLIBC_TUNABLES", ""), "huge_kb": huge_kb}))
"""


def _run_child(**env_overrides: str) -> tuple[int, dict]:
    env = host_memory.environ_without_huge_pages(dict(os.environ))
    env.update(env_overrides)
    proc = subprocess.Popen([sys.executable, "-c", _CHILD], env=env, stdout=subprocess.PIPE, text=True)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0
    return proc.pid, json.loads(out)


@pytest.mark.skipif(host_memory.transparent_huge_pages_mode() == "never", reason="needs Linux with transparent huge pages")
def test_reexec_puts_large_mallocs_on_huge_pages_and_keeps_the_pid():
    pid, report = _run_child(GLIBC_TUNABLES="glibc.malloc.check=0")
    assert report["pid"] == pid  # execve: signals and exit codes still reach the caller's child
    assert report["tunables"].split(":") == ["glibc.malloc.check=0", host_memory.TUNABLE]
    assert report["huge_kb"] >= 32 * 1024


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc tunables are Linux-only")
def test_opt_out_leaves_the_environment_alone():
    _, report = _run_child(FLAN_JAX_HUGE_PAGES="0")
    assert host_memory.TUNABLE not in report["tunables"]
    if host_memory.transparent_huge_pages_mode() == "madvise":  # with "always" the kernel uses huge pages regardless
        assert report["huge_kb"] < 32 * 1024  # the 64 MiB malloc stayed on 4 KiB pages


def test_environment_helpers_keep_other_tunables():
    with_it = host_memory.environ_with_huge_pages({"GLIBC_TUNABLES": "a=1:b=2", "X": "y"})
    assert with_it == {"GLIBC_TUNABLES": f"a=1:b=2:{host_memory.TUNABLE}", "X": "y"}
    assert host_memory.huge_pages_active(with_it)
    assert host_memory.environ_without_huge_pages(with_it) == {"GLIBC_TUNABLES": "a=1:b=2", "X": "y"}
    assert host_memory.environ_without_huge_pages({"GLIBC_TUNABLES": host_memory.TUNABLE}) == {}
