"""Preference tuning with LoRA: DPO's reference is the policy with its adapters switched off.

The reference of a DPO run is its initial policy. A LoRA run starts its adapters at B = 0, so the
initial policy IS the base: with `objective.reference="auto"` (or "adapters_off") the reference
forward runs the same weights with the adapters bypassed, so the state holds one copy of the base,
no reference slot and no cached pre-pass. Checked here: those reference log-probs equal the frozen
initial policy's (the "model" slot) on trained adapters, the state and checkpoints hold one base,
evaluation scores the implicit reward against it, and a SIGKILLed run resumes bitwise.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import traversals

import flan_jax_tasks  # noqa: F401  (registers the built-in tasks and pairs)
from flan_jax.model import lora
from flan_jax.train import checkpointing, loop, objectives, optimizer, partitioning, reference_cache, state as state_lib
from flan_jax.train.objectives.base import ObjectiveContext
from flan_jax.train.objectives.pairwise import ADAPTERS_OFF, REFERENCE_FEATURE, reference_log_probs
from tests import preference_fakes, test_lora_training, test_resume, train_fakes

STEPS = 12
LORA_DPO = {
    "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.1, "trainable.frozen_dtype": "bfloat16",
    "objective.name": "dpo", "data.train_mixture": "synthetic_pairs_train", "data.seq_len": 96,
}


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(cache_dir):
    yield cache_dir


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """Converted weights (a random model of the demo's shape) the LoRA run adapts."""
    return test_lora_training._converted_base(tmp_path_factory.mktemp("lora_dpo") / "base", 3)


def _overrides(tokenizer_path, base, **extra):
    values = train_fakes.demo_overrides(tokenizer_path, checkpoint__init_from=str(base), **extra)
    values.update(LORA_DPO)
    return values


def _run_overrides(tokenizer_path, base):
    return _overrides(tokenizer_path, base, train__num_steps=STEPS, checkpoint__every_steps=3, checkpoint__keep=2)


def test_the_reference_is_the_base_with_adapters_off_equal_to_the_frozen_initial_policy(tokenizer_path, base):
    config = train_fakes.demo_config(_overrides(tokenizer_path, base))
    objective = objectives.get_objective(config)
    # "auto" resolves to the adapters-off reference: no frozen slot, no cached feature.
    assert objective.reference == ADAPTERS_OFF and objective.frozen_slots == ()
    assert REFERENCE_FEATURE not in objective.features
    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.axis_rules(config.mesh)
    model_cfg, parts = loop.build_model(config, mesh, rules)
    initial = loop.initial_params(config, parts, mesh, model_cfg)
    adapters0, base_params = parts.trained_part(initial), parts.base_part(initial)

    # One copy of the base in the state: the trained part is the adapters, the only frozen slot the base.
    tx, _ = optimizer.make_optimizer(config.optimizer, 10)
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)
    assert set(shardings.frozen) == {state_lib.BASE}
    trained_names = {"/".join(map(str, p)) for p in traversals.flatten_mapping(adapters0)}
    assert trained_names and all(lora.is_adapter_path(n) for n in trained_names)
    held = {str(x.dtype) for x in jax.tree.leaves(base_params)}
    assert held == {"bfloat16"}  # the base is held once, in its frozen dtype

    # Adapters as after some training (B != 0): the policy moves, the reference must not.
    flat = traversals.flatten_mapping(adapters0)
    rng = np.random.default_rng(5)
    trained = traversals.unflatten_mapping({
        p: x + jnp.asarray(0.2 * rng.standard_normal(x.shape), x.dtype) if p[-1] == "lora_b" else x
        for p, x in flat.items()
    })
    batch = {k: jnp.asarray(v) for k, v in preference_fakes.packed_batch(
        preference_fakes.random_pairs(8, seed=2), pairs_per_row=2, seq_len=96).items()}

    @jax.jit
    def log_probs(params, base_params, initial_adapters, batch):
        ctx = ObjectiveContext(parts=parts, params=params, frozen_params={state_lib.BASE: base_params}, rng=jax.random.key(0))
        reference = reference_log_probs(objective, ctx, batch)
        policy = objective.response_log_probs(parts.merge(params, base_params), batch)
        # The frozen initial policy: what the "model" reference slot runs (initial adapters on the base).
        frozen_initial = objective.response_log_probs(parts.merge(initial_adapters, base_params), batch)
        return reference, policy, frozen_initial

    with jax.set_mesh(mesh):
        reference, policy, frozen_initial = jax.device_get(log_probs(trained, base_params, adapters0, batch))
    valid = np.asarray(batch["pair_ids"]).max(axis=1) > 0
    assert valid.any()
    for side in ("chosen", "rejected"):
        ref, init, pol = (np.asarray(getattr(x, side)) for x in (reference, frozen_initial, policy))
        np.testing.assert_allclose(ref, init, rtol=1e-6, atol=1e-6)
        assert np.abs(pol - ref).max() > 1e-3  # the trained adapters do change the policy


def test_adapters_off_is_refused_where_the_base_is_not_the_initial_policy(tokenizer_path, base):
    no_lora = train_fakes.demo_config(train_fakes.demo_overrides(
        tokenizer_path, objective__name="dpo", objective__reference="adapters_off"))
    with pytest.raises(ValueError, match=r"adapters_off.*needs a LoRA run"):
        objectives.get_objective(no_lora)
    started = train_fakes.demo_config(_overrides(tokenizer_path, base, objective__reference="adapters_off",
                                                 lora__init_from="/some/peft_adapter"))
    with pytest.raises(ValueError, match=r"lora.init_from='/some/peft_adapter' starts them from a trained adapter"):
        objectives.get_objective(started)
    assert objectives.get_objective(
        train_fakes.demo_config(_overrides(tokenizer_path, base, lora__init_from="/some/peft_adapter"))).reference == "cache"
    partial = train_fakes.demo_config(_overrides(tokenizer_path, base, trainable__paths=("norm",)))
    assert objectives.get_objective(partial).reference == "cache"  # auto: base weights would move too


@pytest.fixture(scope="module")
def lora_dpo_run(tmp_path_factory, tokenizer_path, base):
    """A LoRA DPO run of STEPS steps; also the uninterrupted reference of the resume test."""
    workdir = tmp_path_factory.mktemp("lora_dpo_run")
    config = train_fakes.demo_config(_run_overrides(tokenizer_path, base))
    loop.train(config, workdir)
    return workdir


def test_a_lora_dpo_run_holds_one_base_and_needs_no_reference_pass(lora_dpo_run):
    assert not (lora_dpo_run / reference_cache.CACHE_DIR).exists()
    records = test_resume._records(lora_dpo_run)
    # Step 1: the policy is its reference (B = 0), so every log-ratio is 0 and the loss is log 2.
    assert abs(records[0]["loss"] - math.log(2)) < 1e-6 and abs(records[0]["logps/drift"]) < 1e-6
    assert records[-1]["logps/drift"] != 0.0 and np.isfinite([r["loss"] for r in records]).all()
    checkpoints = checkpointing.Checkpointer(lora_dpo_run, train_fakes.demo_config({}).checkpoint, read_only=True)
    assert checkpoints.latest_step() == STEPS
    assert set(checkpoints.frozen_fingerprints(STEPS)) == {state_lib.BASE}  # no "reference" slot
    # The checkpoint holds the adapters only (and their optimizer state): never the base or a reference.
    directory = lora_dpo_run / "checkpoints" / str(STEPS)
    assert not (directory / "frozen_params").exists()
    params = _saved_arrays(directory / "params")
    assert params and all(p[-1] in lora.ADAPTER_NAMES for p in params)


def _saved_arrays(item_dir) -> list[tuple[str, ...]]:
    """The key paths of the arrays Orbax saved in one checkpoint item (from its _METADATA)."""
    tree = json.loads((item_dir / "_METADATA").read_text())["tree_metadata"]
    return [tuple(k["key"] for k in v["key_metadata"]) for v in tree.values() if v["value_metadata"]["value_type"] == "jax.Array"]

def _command(workdir, tokenizer_path, base):
    overrides = _run_overrides(tokenizer_path, base)
    return [sys.executable, "-m", "flan_jax.train", "--config=configs/demo.py", f"--workdir={workdir}"] + train_fakes.cli_args(overrides)


def test_a_killed_lora_dpo_run_resumes_bitwise(tmp_path, tokenizer_path, base, cache_dir, lora_dpo_run):
    env = train_fakes.subprocess_env(cache_dir)
    resumed = tmp_path / "resumed"
    rng = random.Random(1416)
    for _ in range(3):
        if test_resume._kill_at_random_moment(_command(resumed, tokenizer_path, base), env, resumed, rng):
            break
        shutil.rmtree(resumed)
    else:
        pytest.fail("the run always finished before SIGKILL landed")
    assert test_resume._lines(resumed) < STEPS
    test_resume._run(_command(resumed, tokenizer_path, base), env)
    ref, res = test_resume._records(lora_dpo_run), test_resume._records(resumed)
    assert [r["step"] for r in res] == list(range(1, STEPS + 1))
    for key in ("loss", "grad_norm", "rewards/chosen", "rewards/rejected", "rewards/margin", "logps/drift", "pairs"):
        assert [r[key] for r in res] == [r[key] for r in ref], key  # exact float equality
    a, _, _ = checkpointing.load_model(lora_dpo_run)
    b, _, _ = checkpointing.load_model(resumed)
    leaves = lambda m: traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(m, nnx.Param)))  # noqa: E731
    left, right = leaves(a), leaves(b)
    assert left.keys() == right.keys()
    for name in left:
        assert np.asarray(left[name]).tobytes() == np.asarray(right[name]).tobytes(), name


def test_evaluation_scores_implicit_rewards_against_the_base_with_adapters_off(lora_dpo_run, tokenizer_path):
    """The evaluator's reference of a LoRA DPO run (a view of the same weights) scores pairs exactly
    like the rebuilt initial policy (`flan_jax.evaluate`'s fallback for other runs)."""
    from flan_jax.data.tokenizer import load_tokenizer
    from flan_jax.eval import evaluator
    from flan_jax.eval.preference import load_reference_model

    model, run_config, _ = checkpointing.load_model(lora_dpo_run)
    config = run_config.copy_and_resolve_references()
    config.eval.mixtures = ("synthetic_pairs_eval_heldout_cluster",)
    config.eval.max_examples_per_task = 4
    tokenizer = load_tokenizer(run_config.data, workdir=lora_dpo_run)
    view = evaluator.evaluate(model, tokenizer, config, workdir=None, step=STEPS, reference=lambda: lora.adapters_off(model))
    rebuilt = evaluator.evaluate(model, tokenizer, config, workdir=None, step=STEPS,
                                 reference=lambda: load_reference_model(run_config))
    scores = view["mixtures"]["synthetic_pairs_eval_heldout_cluster"]
    assert {"pair_accuracy", "pair_margin", "logprob_accuracy"} <= set(scores)
    np.testing.assert_allclose(scores["pair_margin"], rebuilt["mixtures"]["synthetic_pairs_eval_heldout_cluster"]["pair_margin"],
                               rtol=1e-5, atol=1e-6)
    assert scores["pair_accuracy"] == rebuilt["mixtures"]["synthetic_pairs_eval_heldout_cluster"]["pair_accuracy"]
    assert scores["pair_margin"] != 0.0  # the trained adapters moved the policy away from the reference
    assert all(m.enabled for _, m in lora.adapters(model))  # the view left the policy as it was
