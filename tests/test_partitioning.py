"""Mesh construction, rule-driven parameter shardings, and sharded == single-device train steps."""

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from flan_jax.train import optimizer, partitioning, state as state_lib, step
from tests import train_fakes


def _mesh(data, fsdp, tensor, n=None):
    config = train_fakes.tiny_config()
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = data, fsdp, tensor
    devices = jax.devices()[:n] if n else None
    return partitioning.make_mesh(config.mesh, devices), config


def test_mesh_fills_minus_one_and_rejects_bad_shapes():
    mesh, _ = _mesh(-1, 2, 2)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
    with pytest.raises(ValueError, match="does not fit 8 devices"):
        _mesh(-1, 3, 1)
    with pytest.raises(ValueError, match="at most one axis may be -1"):
        _mesh(-1, -1, 1)
    with pytest.raises(ValueError, match="uses 4 devices"):
        _mesh(2, 2, 1)


def _setup(mesh, config, name="adamw"):
    config.optimizer.name = name
    rules = partitioning.axis_rules(config.mesh)
    parts = state_lib.ModelParts(lambda: train_fakes.TinyLM(rngs=nnx.Rngs(0)), mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, config.train.num_steps)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, seed=0, mesh=mesh)
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    return parts, state, train_step, rules


def test_parameter_and_optimizer_shardings_follow_the_rules():
    mesh, config = _mesh(2, 2, 2)
    _, state, _, _ = _setup(mesh, config)
    specs = {k: v.sharding.spec for k, v in state.params.items()}
    # DEFAULT_RULES: embed -> fsdp, vocab/mlp -> tensor.
    assert specs == {
        "embed": P("tensor", "fsdp"),
        "norm_scale": P("fsdp"),
        "w_in": P("fsdp", "tensor"),
        "w_out": P("tensor", "fsdp"),
        "head": P("fsdp", "tensor"),
    }
    adam = state.opt_state[1][0]
    for moments in (adam.mu, adam.nu):
        assert {k: v.sharding.spec for k, v in moments.items()} == specs
    assert state.params["w_in"].addressable_shards[0].data.shape == (8, 16)


def test_adafactor_state_is_placed_without_errors():
    mesh, config = _mesh(2, 2, 2)
    _, state, train_step, rules = _setup(mesh, config, name="adafactor")
    batch = partitioning.global_batch(train_fakes.packed_batch(0), partitioning.batch_sharding(mesh, rules))
    with jax.set_mesh(mesh):
        _, metrics = train_step(state, batch)
    assert np.isfinite(float(metrics["loss"]))


def _run_steps(mesh, config, batches):
    _, state, train_step, rules = _setup(mesh, config)
    sharding = partitioning.batch_sharding(mesh, rules)
    losses = []
    with jax.set_mesh(mesh):
        for b in batches:
            state, metrics = train_step(state, partitioning.global_batch(b, sharding))
            losses.append(float(metrics["loss"]))
    return losses, jax.tree.map(np.asarray, state.params)


@pytest.mark.parametrize("shape,devices", [((2, 1, 1), 2), ((2, 2, 2), 8)], ids=["2dev", "8dev-2x2x2"])
def test_sharded_steps_equal_single_device(shape, devices):
    batches = [train_fakes.packed_batch(0)] * 2  # same batch: the 2nd loss must be lower
    ref_losses, ref_params = _run_steps(*_mesh(1, 1, 1, n=1), batches)
    mesh, config = _mesh(*shape, n=devices)
    assert mesh.devices.size == devices
    losses, params = _run_steps(mesh, config, batches)
    np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
    assert ref_losses[1] < ref_losses[0]  # the step did train
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-4), params, ref_params)
    # (Adam divides by sqrt(v): near-zero gradients amplify fp reordering, hence atol ~ lr / 50.)
