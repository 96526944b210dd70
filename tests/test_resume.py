"""Exact resume: SIGKILL at a random moment + the same command again == an uninterrupted run, bit for bit.

In both layer layouts: unrolled (the tiny demo's default) and scanned (stacked layers under lax.scan).
"""

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from flan_jax.train import checkpointing
from tests import train_fakes

NUM_STEPS = 24
LAYOUTS = {"unrolled": {}, "scanned": {"model__scan_layers": True, "model__n_layers": 2}}


def _command(workdir, tokenizer_path, layout="unrolled"):
    overrides = train_fakes.demo_overrides(
        tokenizer_path, train__num_steps=NUM_STEPS, checkpoint__every_steps=3, checkpoint__keep=2, **LAYOUTS[layout]
    )
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}"] + train_fakes.cli_args(overrides)


def _run(cmd, env):
    result = subprocess.run(cmd, cwd=train_fakes.ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]


def _lines(workdir):
    path = workdir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _wait_for_lines(workdir, count: int, proc, limit_s: float = 240.0) -> None:
    """Waits until metrics.jsonl has `count` lines or the process ended (limit: a hung child)."""
    deadline = time.monotonic() + limit_s
    while _lines(workdir) < count and proc.poll() is None:
        if time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"the training process logged {_lines(workdir)} steps in {limit_s}s")
        time.sleep(0.005)


def _kill_at_random_moment(cmd, env, workdir, rng) -> bool:
    """Starts the run, SIGKILLs it after a seeded random number of steps plus a random delay.

    Returns False if the run finished before the kill landed (the caller retries earlier).
    """
    kill_after_steps = rng.randint(4, NUM_STEPS // 2)
    extra_delay = rng.uniform(0.0, 0.05)  # lands anywhere inside a step, a log write or a save
    proc = subprocess.Popen(cmd, cwd=train_fakes.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_lines(workdir, kill_after_steps, proc)
        time.sleep(extra_delay)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait(timeout=60)
    return proc.returncode == -signal.SIGKILL


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def references(tmp_path_factory, tokenizer_path, cache_dir):
    """layout -> an uninterrupted run in that layer layout (run once, when first asked for)."""
    runs = {}

    def get(layout: str):
        if layout not in runs:
            runs[layout] = tmp_path_factory.mktemp(f"reference_{layout}")
            _run(_command(runs[layout], tokenizer_path, layout), train_fakes.subprocess_env(cache_dir))
        return runs[layout]

    return get


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_and_restart_is_bitwise_identical_to_an_uninterrupted_run(tmp_path, tokenizer_path, cache_dir, references, layout):
    env = train_fakes.subprocess_env(cache_dir)
    resumed = tmp_path / "resumed"
    reference = references(layout)

    rng = random.Random(1234)
    for _ in range(3):
        if _kill_at_random_moment(_command(resumed, tokenizer_path, layout), env, resumed, rng):
            break
        shutil.rmtree(resumed)
    else:
        pytest.fail("the run always finished before SIGKILL landed")
    assert _lines(resumed) < NUM_STEPS  # it really was interrupted
    saved = sorted(int(p.name) for p in (resumed / "checkpoints").iterdir() if p.name.isdigit())
    print(f"killed after {_lines(resumed)} logged steps; complete checkpoints: {saved}")
    _run(_command(resumed, tokenizer_path, layout), env)  # the same command again

    ref, res = _records(reference), _records(resumed)
    assert [r["step"] for r in res] == list(range(1, NUM_STEPS + 1))  # no duplicated or missing steps
    for key in ("loss", "learning_rate", "grad_norm", "skipped_steps", "loss_weight_sum"):
        assert [r[key] for r in res] == [r[key] for r in ref], key  # exact float equality

    ref_model, _, ref_step = checkpointing.load_model(reference)
    res_model, _, res_step = checkpointing.load_model(resumed)
    assert ref_step == res_step == NUM_STEPS
    assert res_model.cfg.scanned == (layout == "scanned")
    from flax import nnx

    ref_params = nnx.to_pure_dict(nnx.state(ref_model, nnx.Param))
    res_params = nnx.to_pure_dict(nnx.state(res_model, nnx.Param))
    flat_ref, flat_res = _flatten(ref_params), _flatten(res_params)
    assert flat_ref.keys() == flat_res.keys()
    for name in flat_ref:
        a, b = np.asarray(flat_ref[name]), np.asarray(flat_res[name])
        assert a.tobytes() == b.tobytes(), name  # bitwise


def test_sigterm_saves_exits_0_and_the_restart_matches(tmp_path, tokenizer_path, cache_dir, references):
    env = train_fakes.subprocess_env(cache_dir)
    reference = references("unrolled")
    cmd = _command(tmp_path, tokenizer_path)
    log = tmp_path / "stderr.txt"
    with open(log, "w") as stderr_file:  # a file, not a pipe: a full pipe would block the child
        proc = subprocess.Popen(cmd, cwd=train_fakes.ROOT, env=env, stdout=subprocess.DEVNULL, stderr=stderr_file)
        try:
            _wait_for_lines(tmp_path, 5, proc)
            proc.send_signal(signal.SIGTERM)
            proc.wait(timeout=120)
        finally:
            if proc.poll() is None:
                proc.kill()
    stderr = log.read_text()
    assert proc.returncode == 0, stderr[-3000:]
    logged = _lines(tmp_path)
    assert logged < NUM_STEPS, "the run finished before SIGTERM arrived"
    assert "SIGTERM received" in stderr
    saved = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert saved[-1] == logged  # the step it stopped at was checkpointed
    _run(cmd, env)
    assert [r["loss"] for r in _records(tmp_path)] == [r["loss"] for r in _records(reference)]


def _flatten(tree, prefix=""):
    out = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}/"))
        else:
            out[f"{prefix}{key}"] = value
    return out
