"""Exact resume of a DPO run (cached reference): SIGKILL + the same command == an uninterrupted run, bit for bit."""

import random
import shutil
import sys

import numpy as np
import pytest
from flax import nnx

import flan_jax_tasks  # noqa: F401  (registers the built-in tasks and pairs)
from flan_jax.train import checkpointing, loop
from tests import train_fakes
from tests.test_resume import NUM_STEPS, _kill_at_random_moment, _lines, _records, _run


def _command(workdir, tokenizer_path, sft_workdir):
    overrides = train_fakes.demo_overrides(
        tokenizer_path, train__num_steps=NUM_STEPS, checkpoint__every_steps=3, checkpoint__keep=2,
        objective__name="dpo", data__train_mixture="synthetic_pairs_train", data__seq_len=96,
        checkpoint__init_from=str(sft_workdir),
    )
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}"] + train_fakes.cli_args(overrides)


@pytest.fixture(scope="module")
def sft_workdir(tmp_path_factory, tokenizer_path, cache_dir):
    workdir = tmp_path_factory.mktemp("sft")
    loop.train(train_fakes.demo_config(train_fakes.demo_overrides(tokenizer_path, train__num_steps=2)), workdir)
    return workdir


def test_a_killed_dpo_run_resumes_bitwise(tmp_path, tokenizer_path, cache_dir, sft_workdir):
    env = train_fakes.subprocess_env(cache_dir)
    reference = tmp_path / "reference"
    _run(_command(reference, tokenizer_path, sft_workdir), env)
    resumed = tmp_path / "resumed"
    rng = random.Random(14)
    for _ in range(3):
        if _kill_at_random_moment(_command(resumed, tokenizer_path, sft_workdir), env, resumed, rng):
            break
        shutil.rmtree(resumed)
    else:
        pytest.fail("the run always finished before SIGKILL landed")
    assert _lines(resumed) < NUM_STEPS
    _run(_command(resumed, tokenizer_path, sft_workdir), env)

    ref, res = _records(reference), _records(resumed)
    assert [r["step"] for r in res] == list(range(1, NUM_STEPS + 1))
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/drift", "pairs"):
        assert [r[key] for r in res] == [r[key] for r in ref], key  # exact float equality
    ref_model, _, _ = checkpointing.load_model(reference)
    res_model, _, _ = checkpointing.load_model(resumed)
    ref_params = _flat_params(ref_model)
    for name, value in _flat_params(res_model).items():
        assert value.tobytes() == ref_params[name].tobytes(), name


def _flat_params(model) -> dict:
    from flan_jax.convert import checkpoint

    return {p: np.asarray(v) for p, v in checkpoint.flatten(nnx.state(model, nnx.Param)).items()}
