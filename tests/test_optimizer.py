"""Schedules, weight-decay mask, clipping and gradient accumulation."""

import jax
import numpy as np
import pytest
from flax import nnx

from flan_jax.train import optimizer, partitioning, state as state_lib, step
from tests import train_fakes


def _opt_config(**overrides):
    config = train_fakes.tiny_config().optimizer
    for k, v in overrides.items():
        config[k] = v
    return config


@pytest.mark.parametrize("kind", ["cosine", "linear", "constant"])
def test_schedule_warms_up_then_decays_to_the_end_fraction(kind):
    cfg = _opt_config(schedule=kind, learning_rate=1.0, warmup_steps=10, end_learning_rate_fraction=0.1)
    lr = optimizer.make_schedule(cfg, num_steps=110)
    assert float(lr(0)) == 0.0
    assert float(lr(5)) == pytest.approx(0.5)
    assert float(lr(10)) == pytest.approx(1.0)
    expected_end = {"cosine": 0.1, "linear": 0.1, "constant": 1.0}[kind]
    assert float(lr(110)) == pytest.approx(expected_end, abs=1e-6)
    if kind == "cosine":  # half way through the decay: halfway between peak and end
        assert float(lr(60)) == pytest.approx(0.55, abs=1e-6)
    with pytest.raises(ValueError, match="schedule"):
        optimizer.make_schedule(_opt_config(schedule="exp"), 10)


def test_decay_mask_excludes_norms_biases_embeddings_and_custom_patterns():
    params = {"embed": {"embedding": 0}, "layers": {"0": {"attn_norm": {"scale": 0}, "q": {"kernel": 0, "bias": 0}}}}
    mask = optimizer.decay_mask(params, (r"norm", r"bias", r"embed"))
    assert mask == {"embed": {"embedding": False}, "layers": {"0": {"attn_norm": {"scale": False}, "q": {"kernel": True, "bias": False}}}}
    mask = optimizer.decay_mask(params, (r"q/kernel$",))
    assert mask["layers"]["0"]["q"] == {"kernel": False, "bias": True}


def test_weight_decay_only_touches_masked_parameters():
    # Zero gradients: AdamW's update is then exactly -lr * wd * param on decayed parameters.
    cfg = _opt_config(learning_rate=0.1, weight_decay=0.5, clip_norm=0.0, no_decay_patterns=(r"norm", r"embed"))
    tx, _ = optimizer.make_optimizer(cfg, 10)
    params = {"embed": np.ones(3, np.float32), "norm_scale": np.ones(3, np.float32), "w": np.ones(3, np.float32)}
    updates, _ = tx.update(jax.tree.map(np.zeros_like, params), tx.init(params), params)
    np.testing.assert_allclose(updates["embed"], 0.0)
    np.testing.assert_allclose(updates["norm_scale"], 0.0)
    np.testing.assert_allclose(updates["w"], -0.05, rtol=1e-6)


def test_global_norm_clipping_bounds_the_update():
    # With eps >> |g| Adam's first update is ~ -lr * g / eps, i.e. linear in the (clipped) gradient.
    cfg = _opt_config(learning_rate=1e6, eps=1e6, weight_decay=0.0, clip_norm=1.0, warmup_steps=0, schedule="constant")
    tx, _ = optimizer.make_optimizer(cfg, 10)
    grads = {"w": np.full(4, 10.0, np.float32)}  # global norm 20
    zeros = jax.tree.map(np.zeros_like, grads)
    updates, _ = tx.update(grads, tx.init(zeros), zeros)
    assert np.linalg.norm(updates["w"]) == pytest.approx(1.0, rel=1e-4)
    cfg.clip_norm = 0.0
    tx, _ = optimizer.make_optimizer(cfg, 10)
    zeros = jax.tree.map(np.zeros_like, grads)
    updates, _ = tx.update(grads, tx.init(zeros), zeros)
    assert np.linalg.norm(updates["w"]) == pytest.approx(20.0, rel=1e-3)


def _train_params(accum: int, normalization: str):
    config = train_fakes.tiny_config()
    config.optimizer.grad_accum_steps = accum
    config.loss.normalization = normalization
    mesh = partitioning.make_mesh(config.mesh)  # 8 devices, data-parallel
    rules = partitioning.axis_rules(config.mesh)
    parts = state_lib.ModelParts(lambda: train_fakes.TinyLM(rngs=nnx.Rngs(0)), mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 10)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    batch = train_fakes.packed_batch(3, rows=16)
    with jax.set_mesh(mesh):
        state, metrics = train_step(state, partitioning.global_batch(batch, partitioning.batch_sharding(mesh, rules)))
    return float(metrics["loss"]), float(metrics["grad_norm"]), jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("normalization", ["tokens", "sequences"])
def test_gradient_accumulation_equals_the_large_batch(normalization):
    loss1, norm1, params1 = _train_params(1, normalization)
    loss2, norm2, params2 = _train_params(2, normalization)
    assert loss2 == pytest.approx(loss1, rel=1e-5)
    assert norm2 == pytest.approx(norm1, rel=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), params2, params1)
