"""The workdir lock: one trainer per workdir, stale locks of dead processes taken over."""

import errno
import json
import os
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from flan_jax.train import exit_codes, workdir_lock
from flan_jax.train.workdir_lock import WorkdirLock
from tests import train_fakes

HOLD = textwrap.dedent("""
    import sys, time
    from flan_jax.train.workdir_lock import WorkdirLock
    with WorkdirLock(sys.argv[1]):
        print("held", flush=True)
        time.sleep(60)
""")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_live_holder_in_another_process_is_refused_with_its_pid(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(train_fakes.ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(exit_codes.WorkdirLockedError, match=f"in use by another trainer: pid {holder.pid} on host") as error:
            WorkdirLock(tmp_path).acquire()
        assert error.value.exit_code == exit_codes.ExitCode.WORKDIR_LOCKED == 6
    finally:
        holder.kill()
        holder.wait()
    # The kernel released the killed holder's lock; its record is still in the file: taken over.
    with WorkdirLock(tmp_path):
        assert json.loads((tmp_path / "lock").read_text())["pid"] == os.getpid()
    assert (tmp_path / "lock").read_text() == ""  # a clean release empties it


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_a_warning(tmp_path, caplog):
    dead = _dead_pid()
    (tmp_path / "lock").write_text(json.dumps({"pid": dead, "host": socket.gethostname(), "started": "earlier"}))
    with caplog.at_level("WARNING"):
        with WorkdirLock(tmp_path):
            pass
    assert f"was left by pid {dead}" in caplog.text and "taking it over" in caplog.text


def test_without_working_flock_the_holder_is_judged_by_pid_and_heartbeat(tmp_path, monkeypatch):
    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(workdir_lock.fcntl, "flock", no_flock)
    lock_file = tmp_path / "lock"
    lock_file.write_text(json.dumps({"pid": os.getppid(), "host": socket.gethostname(), "started": "t"}))
    with pytest.raises(exit_codes.WorkdirLockedError, match=f"pid {os.getppid()}"):
        WorkdirLock(tmp_path).acquire()  # same host, live pid
    lock_file.write_text(json.dumps({"pid": 1, "host": "other-host", "started": "t"}))
    with pytest.raises(exit_codes.WorkdirLockedError, match="host 'other-host'.*heartbeat 0s ago"):
        WorkdirLock(tmp_path).acquire()  # another host, fresh heartbeat
    old = time.time() - 2 * workdir_lock.STALE_AFTER_S
    os.utime(lock_file, (old, old))
    with WorkdirLock(tmp_path):  # another host, heartbeat long gone
        assert json.loads(lock_file.read_text())["host"] == socket.gethostname()
