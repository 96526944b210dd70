"""Run safety of `python -m flan_jax.train` with real processes: the workdir lock, exit codes,
SIGTERM during start-up; and, in process, the skip limits and refused config changes."""

import json
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flan_jax.train import exit_codes, loop, partitioning
from tests import train_fakes


def _command(workdir, tokenizer_path, **overrides):
    values = train_fakes.demo_overrides(tokenizer_path, **overrides)
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}", *train_fakes.cli_args(values)]


def _steps(workdir):
    path = workdir / "metrics.jsonl"
    return [json.loads(line)["step"] for line in path.read_text().splitlines()] if path.exists() else []


def test_a_second_trainer_on_a_busy_workdir_exits_at_once_and_the_first_is_untouched(tmp_path, tokenizer_path, cache_dir):
    env = train_fakes.subprocess_env(cache_dir)
    command = _command(tmp_path, tokenizer_path, train__num_steps=100_000, checkpoint__every_steps=1000, train__log_every=5)
    log = open(tmp_path.parent / f"{tmp_path.name}-first.log", "w")  # a file: a full pipe would stall the trainer
    first = subprocess.Popen(command, cwd=train_fakes.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=log)
    try:
        deadline = time.monotonic() + 240
        while len(_steps(tmp_path)) < 2 and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        second = subprocess.run(command, cwd=train_fakes.ROOT, env=env, capture_output=True, text=True, timeout=240)
        assert first.poll() is None, "the first trainer ended before the second one finished"
        first.send_signal(signal.SIGTERM)  # the first one then checkpoints and exits 0
        first.wait(timeout=240)
    finally:
        first.kill()
        log.close()
    first_err = open(log.name).read()
    assert second.returncode == exit_codes.ExitCode.WORKDIR_LOCKED, second.stderr[-3000:]
    assert f"in use by another trainer: pid {first.pid} on host" in second.stderr
    assert "Traceback" not in second.stderr
    assert first.returncode == 0, first_err[-3000:]
    logged = _steps(tmp_path)
    assert logged == list(range(5, 5 * len(logged) + 1, 5))  # every step logged once, by the first trainer only
    assert (tmp_path / "lock").read_text() == ""


def test_sigterm_during_start_up_exits_0_before_the_first_step(tmp_path, tokenizer_path, cache_dir):
    proc = subprocess.Popen(_command(tmp_path, tokenizer_path), cwd=train_fakes.ROOT, env=train_fakes.subprocess_env(cache_dir),
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        seen = []
        for line in proc.stderr:  # the mesh is logged early in start-up, before restore and compile
            seen.append(line)
            if "Mesh" in line:
                proc.send_signal(signal.SIGTERM)
                break
        rest = proc.stderr.read()
        proc.wait(timeout=240)
    finally:
        proc.kill()
    assert proc.returncode == 0, "".join(seen)[-2000:] + rest[-3000:]
    assert "SIGTERM received during start-up" in rest and not _steps(tmp_path)


@pytest.fixture
def compilation_cache(cache_dir):
    return cache_dir


def _poison_calls(monkeypatch, calls_to_poison):
    """NaN loss weights for the given 1-based batch numbers."""
    original = partitioning.global_batch
    count = {"n": 0}

    def patched(batch, sharding):
        count["n"] += 1
        if count["n"] in calls_to_poison:
            batch = {**batch, "loss_weights": np.full_like(batch["loss_weights"], np.nan)}
        return original(batch, sharding)

    monkeypatch.setattr(partitioning, "global_batch", patched)


@pytest.mark.parametrize("limits,poisoned,message", [
    ({"train__max_consecutive_skips": 2}, {2, 3, 4}, "3 consecutive skipped updates .*max_consecutive_skips=2"),
    ({"train__max_skipped_steps": 1}, {2, 4}, "2 skipped updates in all .*max_skipped_steps=1"),
])
def test_skipping_stops_past_its_limits(tmp_path, tokenizer_path, monkeypatch, compilation_cache, limits, poisoned, message):
    overrides = train_fakes.demo_overrides(tokenizer_path, train__num_steps=8, train__on_nonfinite="skip",
                                           train__log_every=4, checkpoint__every_steps=100, **limits)
    _poison_calls(monkeypatch, poisoned)
    with pytest.raises(exit_codes.NonFiniteError, match=f"{message}.*first at step 2.*No checkpoint with verified checksums"):
        loop.train(train_fakes.demo_config(overrides), tmp_path)
    assert not (tmp_path / "checkpoints").exists() or not list((tmp_path / "checkpoints").iterdir())


def test_config_changes_on_resume_are_refused_or_allowed_and_recorded(tmp_path, tokenizer_path, compilation_cache):
    overrides = train_fakes.demo_overrides(tokenizer_path, train__num_steps=2)
    loop.train(train_fakes.demo_config(overrides), tmp_path)
    config_json = (tmp_path / "config.json").read_bytes()

    for change, allow in (({"data.batch_size": 4}, True), ({"optimizer.grad_accum_steps": 2}, False)):
        with pytest.raises(exit_codes.ConfigMismatchError, match="|".join(f"config.{k} " for k in change)):
            loop.train(train_fakes.demo_config({**overrides, **change, "train.allow_config_change": allow, "train.num_steps": 4}), tmp_path)
        assert (tmp_path / "config.json").read_bytes() == config_json  # a refused restart changes nothing

    allowed = {**overrides, "optimizer.learning_rate": 1e-3, "train.allow_config_change": True, "train.log_every": 2,
               "train.num_steps": 4}
    loop.train(train_fakes.demo_config(allowed), tmp_path)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 4]
    assert records[2]["config_changes"] == {"optimizer.learning_rate": [0.003, 0.001], "train.num_steps": [2, 4]}
    assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["learning_rate"] == 0.001
