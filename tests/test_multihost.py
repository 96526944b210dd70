"""Two CPU processes on 127.0.0.1 (gloo collectives) train like one process with the same global batch."""

import json
import signal
import socket
import subprocess
import sys
import time

import numpy as np

from tests import train_fakes

NUM_STEPS = 3


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(workdir, tokenizer_path, **extra):
    extra.setdefault("train__num_steps", NUM_STEPS)
    extra.setdefault("checkpoint__every_steps", 2)
    overrides = train_fakes.demo_overrides(tokenizer_path, **extra)
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}"] + train_fakes.cli_args(overrides)


def _losses(workdir):
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, NUM_STEPS + 1))
    return [r["loss"] for r in records], [r["grad_norm"] for r in records]


def _start_two_processes(workdir, tokenizer_path, cache_dir, logs, **extra) -> list[subprocess.Popen]:
    """Two trainer processes of one run on 127.0.0.1, 2 devices each, output in the `logs` files."""
    address = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(2):
        with open(logs[i], "w") as log:  # files, not pipes: a full pipe would block one process and both hang
            procs.append(
                subprocess.Popen(
                    _command(
                        workdir,
                        tokenizer_path,
                        distributed__initialize=True,
                        distributed__coordinator_address=address,
                        distributed__num_processes=2,
                        distributed__process_id=i,
                        **extra,
                    ),
                    cwd=train_fakes.ROOT,
                    env=train_fakes.subprocess_env(cache_dir, XLA_FLAGS="--xla_force_host_platform_device_count=2"),
                    stdout=log,
                    stderr=subprocess.STDOUT,
                )
            )
    return procs


def _run_one_process(workdir, tokenizer_path, cache_dir, devices: int, **extra) -> subprocess.CompletedProcess:
    """The same run in one process on `devices` simulated devices; asserts it succeeded."""
    result = subprocess.run(
        _command(workdir, tokenizer_path, **extra),
        cwd=train_fakes.ROOT,
        env=train_fakes.subprocess_env(cache_dir, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _wait_all(procs, timeout_s: float = 300) -> None:
    try:
        for proc in procs:
            proc.wait(timeout=timeout_s)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()


def test_two_processes_match_one_process(tmp_path, tokenizer_path, cache_dir):
    multi = tmp_path / "multi"
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    with_eval = {"eval__mixtures": ("synthetic_eval_heldout_cluster",), "eval__at_start": False}
    procs = _start_two_processes(multi, tokenizer_path, cache_dir, logs, **with_eval)
    _wait_all(procs)
    outputs = [log.read_text() for log in logs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
    assert "process 1 of 2" in outputs[1] or "process 1 of 2" in outputs[0]

    single = tmp_path / "single"
    _run_one_process(single, tokenizer_path, cache_dir, 4, **with_eval)

    multi_loss, multi_norm = _losses(multi)
    single_loss, single_norm = _losses(single)
    np.testing.assert_allclose(multi_loss, single_loss, rtol=1e-5)
    np.testing.assert_allclose(multi_norm, single_norm, rtol=1e-4)
    # The final evaluation: every process evaluates the whole set on the global params, process 0
    # writes; the same predictions and scores as one process.
    predictions = [(workdir / f"eval/predictions_{NUM_STEPS}.jsonl").read_text() for workdir in (multi, single)]
    assert predictions[0] and predictions[0] == predictions[1]
    scores = [
        json.loads((workdir / f"eval/step_{NUM_STEPS}.json").read_text())["mixtures"]["synthetic_eval_heldout_cluster"]
        for workdir in (multi, single)
    ]
    assert scores[0]["exact_match"] == scores[1]["exact_match"]
    np.testing.assert_allclose(scores[0]["loss"], scores[1]["loss"], rtol=1e-5)
    # Each process saved only its own data-iterator state (it loaded only its own rows).
    iterator_files = sorted(p.name for p in (multi / "checkpoints" / "2" / "data_iter").glob("*.json"))
    assert iterator_files == ["process_0-of-2.json", "process_1-of-2.json"]

    # The one-process run resumes on 8 devices and a (2, 2, 2) mesh: same workdir, other device count.
    resumed = _run_one_process(single, tokenizer_path, cache_dir, 8, train__num_steps=NUM_STEPS + 2, mesh__fsdp=2, mesh__tensor=2,
                               train__allow_config_change=True)  # a longer run: another schedule length
    assert "Resumed from checkpoint" in resumed.stderr and "'fsdp': 2" in resumed.stderr
    steps = [json.loads(line)["step"] for line in (single / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, NUM_STEPS + 3))

    # The two-process run resumes in ONE process: its two iterator files are merged by row slot, so
    # steps 4-5 see the same global batches as the one-process run that resumed above.
    multi_resumed = _run_one_process(multi, tokenizer_path, cache_dir, 4, train__num_steps=NUM_STEPS + 2,
                                     train__allow_config_change=True)
    assert "merging row slots" in multi_resumed.stderr
    after = {}
    for workdir in (multi, single):
        records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
        after[workdir.name] = [r["loss"] for r in records if r["step"] > NUM_STEPS]
    assert len(after["multi"]) == 2
    np.testing.assert_allclose(after["multi"], after["single"], rtol=1e-4)



def test_sigterm_to_one_process_stops_both_at_one_checkpointed_log_step(tmp_path, tokenizer_path, cache_dir):
    """Preemption of one host: the processes agree at the next log step, both save it and exit 0."""
    num_steps, log_every = 60, 2
    logs = [tmp_path / f"process_{i}.log" for i in range(2)]
    workdir = tmp_path / "run"
    extra = dict(train__num_steps=num_steps, train__log_every=log_every, checkpoint__every_steps=1000)
    procs = _start_two_processes(workdir, tokenizer_path, cache_dir, logs, **extra)
    metrics = workdir / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.exists() and metrics.read_text().count("\n") >= 2) and all(p.poll() is None for p in procs):
        assert time.monotonic() < deadline, "the two processes logged nothing in 240 s"
        time.sleep(0.01)
    procs[1].send_signal(signal.SIGTERM)  # only the second host is preempted
    _wait_all(procs, timeout_s=120)
    outputs = [log.read_text() for log in logs]
    for proc, out in zip(procs, outputs):
        assert proc.returncode == 0, out[-3000:]
        assert "SIGTERM received: saving a checkpoint" in out  # both processes took the decision

    logged = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    last = logged[-1]
    assert last < num_steps, "the run finished before SIGTERM arrived"
    assert last % log_every == 0  # the flag is only exchanged at log steps
    saved = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
    assert saved == [last]  # every_steps=1000: the only checkpoint is the preemption save
    iterator_files = sorted(p.name for p in (workdir / "checkpoints" / str(last) / "data_iter").glob("*.json"))
    assert iterator_files == ["process_0-of-2.json", "process_1-of-2.json"]

    # The same two-process command resumes from that step and finishes.
    logs = [tmp_path / f"resumed_{i}.log" for i in range(2)]
    procs = _start_two_processes(workdir, tokenizer_path, cache_dir, logs, **dict(extra, train__num_steps=last + 2, train__allow_config_change=True))
    _wait_all(procs)
    for proc, log in zip(procs, logs):
        assert proc.returncode == 0, log.read_text()[-3000:]
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == logged + [last + 2]
