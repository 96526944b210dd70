"""An RL run killed with SIGKILL at a random moment and restarted logs exactly what an uninterrupted one does.

GRPO with a KL term (the frozen reference rebuilt on resume) and two epochs per rollout (off-policy
updates); PPO with a value head, a KL penalty, PPO-ptx (a second data stream) and two minibatches
per rollout: every piece of state an RL run carries.
"""

from __future__ import annotations

import json
import random
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
from flax import nnx

from flan_jax.rl.loop import TIMING_KEYS
from flan_jax.train import checkpointing, loop
from tests import rl_fakes, train_fakes

NUM_STEPS = 8
NOT_REPRODUCED = set(TIMING_KEYS) | {"tokens_per_sec", "mfu", "generation_seconds"}


RUNS = {
    "grpo": dict(rl__epochs=2),
    "ppo": dict(rl__ptx_coef=0.1, rl__ptx_mixture="synthetic_train", rl__ptx_batch_size=8, rl__minibatches=2),
}
LOGGED = {  # besides loss, reward, reward_std, entropy, completion_length, prompts_read, learning_rate
    "grpo": {"kl", "clip_fraction", "ratio", "frac_reward_zero_std"},
    "ppo": {"vf_loss", "ptx_loss", "kl_ref", "clip_fraction", "values"},
}


def _overrides(tokenizer_path, objective):
    return rl_fakes.rl_overrides(
        tokenizer_path, objective, train__num_steps=NUM_STEPS, checkpoint__every_steps=2, checkpoint__keep=2,
        **RUNS[objective],
    )


def _command(workdir, tokenizer_path, objective):
    overrides = _overrides(tokenizer_path, objective)
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}", *train_fakes.cli_args(overrides)]


def _run(cmd, env):
    result = subprocess.run(cmd, cwd=train_fakes.ROOT, env=env, capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]


def _saved(workdir) -> bool:
    folder = workdir / "checkpoints"
    return folder.is_dir() and any(p.name.isdigit() for p in folder.iterdir())


def _lines(workdir) -> int:
    path = workdir / "metrics.jsonl"
    return path.read_text().count("\n") if path.exists() else 0


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("objective", sorted(RUNS))
def test_sigkill_and_restart_of_an_rl_run_is_bitwise_identical(objective, tmp_path, tokenizer_path, cache_dir):
    env = train_fakes.subprocess_env(cache_dir)
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    # The uninterrupted run in this process (its compiled steps land in the cache the children read)
    loop.train(train_fakes.demo_config(_overrides(tokenizer_path, objective)), reference)

    rng = random.Random(15)
    for _ in range(3):
        proc = subprocess.Popen(_command(resumed, tokenizer_path, objective), cwd=train_fakes.ROOT, env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        kill_after = rng.randint(3, NUM_STEPS - 3)
        deadline = time.monotonic() + 300
        # after a random number of steps, once a checkpoint is complete (so the restart resumes mid-run)
        while (_lines(resumed) < kill_after or not _saved(resumed)) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.05))  # anywhere inside a rollout, an update, a log write or a save
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        if _lines(resumed) < NUM_STEPS:
            break
        shutil.rmtree(resumed)
    else:
        pytest.fail("the run always finished before SIGKILL landed")
    assert _saved(resumed)  # it resumes mid-run
    _run(_command(resumed, tokenizer_path, objective), env)  # the same command again

    ref, res = _records(reference), _records(resumed)
    assert [r["step"] for r in res] == list(range(1, NUM_STEPS + 1))
    keys = set(ref[0]) - NOT_REPRODUCED
    common = {"loss", "reward", "reward_std", "entropy", "completion_length", "prompts_read", "learning_rate"}
    assert common | LOGGED[objective] <= keys
    for key in sorted(keys):
        assert [r[key] for r in res] == [r[key] for r in ref], key  # exact equality, every logged step
    ref_model, _, _ = checkpointing.load_model(reference)
    res_model, _, _ = checkpointing.load_model(resumed)
    for a, b in zip(jax.tree.leaves(nnx.state(ref_model, nnx.Param)), jax.tree.leaves(nnx.state(res_model, nnx.Param))):
        assert np.asarray(a).tobytes() == np.asarray(b).tobytes()  # policy (and value head), bitwise
