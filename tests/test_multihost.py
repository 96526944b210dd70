"""Two CPU processes on 127.0.0.1 (gloo collectives) train like one process with the same global batch."""

import json
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests import train_fakes

NUM_STEPS = 3


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    yield from train_fakes.compilation_cache(tmp_path_factory)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    return train_fakes.train_tokenizer(tmp_path_factory.mktemp("tokenizer"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, tokenizer_path, **extra):
    extra.setdefault("train__num_steps", NUM_STEPS)
    overrides = train_fakes.demo_overrides(tokenizer_path, checkpoint__every_steps=2, **extra)
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}"] + train_fakes.cli_args(overrides)


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    return [r["loss"] for r in records], [r["grad_norm"] for r in records]


def test_two_processes_match_one_process(tmp_path, tokenizer_path, cache_dir):
    two_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    four_devices = {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}

    address = f"127.0.0.1:{_free_port()}"
    multi = tmp_path / "multi"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:  # files, not pipes: a full pipe would block one process and both hang
            procs.append(
                subprocess.Popen(
                    _command(
                        multi,
                        tokenizer_path,
                        distributed__initialize=True,
                        distributed__coordinator_address=address,
                        distributed__num_processes=2,
                        distributed__process_id=i,
                    ),
                    cwd=train_fakes.ROOT,
                    env=train_fakes.subprocess_env(cache_dir, **two_devices),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    try:
        for proc in procs:
            proc.wait(timeout=300)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    outputs = [log.read_text() for log in logs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    assert "process 1 of 2" in outputs[1] or "process 1 of 2" in outputs[0]

    single = tmp_path / "single"
    result = subprocess.run(
        _command(single, tokenizer_path),
        cwd=train_fakes.ROOT,
        env=train_fakes.subprocess_env(cache_dir, **four_devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]

    multi_loss, multi_norm = _losses(multi)
    single_loss, single_norm = _losses(single)
    np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5)
    np.testing.assert_allclose(multi_norm, single_norm, rtol=1e-4)
    # Each process saved only its own data-iterator state (it loaded only its own rows).
    iterator_files = sorted(p.name for p in (multi / "checkpoints" / "2" / "data_iter").glob("*.json"))
    assert iterator_files == ["process_0-of-2.json", "process_1-of-2.json"]

    # The one-process run resumes on 8 devices and a (2, 2, 2) mesh: same workdir, other device count.
    resumed = subprocess.run(
        _command(single, tokenizer_path, train__num_steps=NUM_STEPS + 2, mesh__fsdp=2, mesh__tensor=2),
        cwd=train_fakes.ROOT,
        env=train_fakes.subprocess_env(cache_dir, XLA_FLAGS="--xla_force_host_platform_device_count=8"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "Resumed from checkpoint" in resumed.stderr and "'fsdp': 2" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, NUM_STEPS + 3))

    # The two-process run resumes in ONE process: its two iterator files are merged by row slot, so
    # steps 4-5 see the same global batches as the one-process run that resumed above.
    multi_resumed = subprocess.run(
        _command(multi, tokenizer_path, train__num_steps=NUM_STEPS + 2),
        cwd=train_fakes.ROOT,
        env=train_fakes.subprocess_env(cache_dir, **four_devices),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert multi_resumed.returncode == 0, multi_resumed.stderr[-3000:]
    assert "merging row slots" in multi_resumed.stderr
    after = {}
    for workdir in (multi, single):
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        after[workdir.name] = [r["loss"] for r in records if r["step"] > NUM_STEPS]
    assert len(after["multi"]) == 2
    np.testing.assert_allclose(after["multi"], after["single"], rtol=1e-4)

