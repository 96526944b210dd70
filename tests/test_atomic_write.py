"""Atomic rewrites: a process killed halfway through rewriting a file leaves the old file intact."""

import json
import os
import signal
import subprocess
import sys

import pytest

from flan_jax import atomic_write
from tests import train_fakes

REWRITE = "from etils import epath; from flan_jax.train import metrics; metrics.truncate_jsonl(epath.Path({path!r}), 1500)"


def _history(path, n=3000):
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in range(1, n + 1)))
    return path.read_bytes()


def test_a_kill_during_the_metrics_rewrite_of_a_resume_keeps_the_history(tmp_path):
    path = tmp_path / "metrics.jsonl"
    before = _history(path)
    env = {**os.environ, "PYTHONPATH": str(train_fakes.ROOT), atomic_write.TEST_KILL_ENV: "metrics.jsonl"}
    killed = subprocess.run([sys.executable, "-c", REWRITE.format(path=str(path))], env=env, capture_output=True, timeout=120)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]  # the hook fired halfway through the write
    assert path.read_bytes() == before  # the whole history is still there
    (leftover,) = [p for p in tmp_path.iterdir() if p.name != "metrics.jsonl"]
    assert leftover.name.startswith(".metrics.jsonl.tmp-") and 0 < leftover.stat().st_size < len(before)
    assert atomic_write.remove_stale_temporaries(tmp_path) == [leftover.name]

    del env[atomic_write.TEST_KILL_ENV]
    subprocess.run([sys.executable, "-c", REWRITE.format(path=str(path))], env=env, check=True, timeout=120)
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == list(range(1, 1501))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "config.json"
    path.write_text("old")
    with pytest.raises(ZeroDivisionError):
        with atomic_write.replacing(path) as tmp:
            open(tmp, "w").write("half")
            1 / 0
    assert path.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
    atomic_write.write_text(path, "new")
    assert path.read_text() == "new" and sorted(p.name for p in tmp_path.iterdir()) == ["config.json"]
