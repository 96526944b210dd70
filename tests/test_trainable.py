"""The trainable-parameter filter: what `config.trainable` selects, its errors, and a partial
fine-tuning step that trains exactly the selected parameters as full fine-tuning would."""

import jax
import numpy as np
import ml_collections
import optax
import pytest
from flax import nnx
from flax.nnx import traversals

from flan_jax import model as fm
from flan_jax.model import registry
from flan_jax.train import optimizer, partitioning, state as state_lib, step, trainable
from tests import train_fakes

CFG = fm.ModelConfig.for_family("llama", vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8,
                                d_ff=24, max_positions=16)


@pytest.fixture(scope="module")
def abstract():
    model = nnx.eval_shape(lambda: registry.build_model(CFG, rngs=nnx.Rngs(0)))
    state = nnx.state(model, nnx.Param)
    return nnx.to_pure_dict(state), partitioning.param_logical_axes(state)


def _names(selection):
    return sorted(trainable.path_str(p) for p in selection.trained)


def test_selection_by_path_logical_axis_and_exclusion(abstract):
    params, axes = abstract
    attention = trainable.Spec(paths=(r"attn/(q|k|v|o)/kernel$",)).select(params, axes)
    assert _names(attention) == sorted(f"layers/{i}/attn/{p}/kernel" for i in range(2) for p in "qkvo")
    no_embeddings = trainable.Spec(exclude=(r"^embed", r"^lm_head")).select(params, axes)
    assert "embed" not in _names(no_embeddings) and "lm_head" not in _names(no_embeddings)
    assert len(no_embeddings.trained) == len(no_embeddings.paths) - 2
    heads = trainable.Spec(logical_axes=("kv_heads",)).select(params, axes)
    assert _names(heads) == sorted(f"layers/{i}/attn/{p}/kernel" for i in range(2) for p in "kv")
    assert trainable.Spec().trains_everything and trainable.Spec().select(params, axes).everything
    summary = attention.summary(params)
    assert summary.startswith("trains 1,536 of ") and "layers/*/attn/q/kernel" in summary


def test_filter_errors_list_what_could_match(abstract):
    params, axes = abstract
    with pytest.raises(ValueError, match=r"paths: 'atn/q' matches no parameter.*final_norm/scale.*layers/\*/attn/q/kernel"):
        trainable.Spec(paths=("atn/q",)).select(params, axes)
    with pytest.raises(ValueError, match=r"exclude: 'bias' matches no parameter"):
        trainable.Spec(exclude=("bias",)).select(params, axes)
    with pytest.raises(ValueError, match=r"no parameter has a dimension named 'expert'.*'heads'"):
        trainable.Spec(logical_axes=("expert",)).select(params, axes)
    with pytest.raises(ValueError, match="selects no parameter to train"):
        trainable.Spec(paths=("norm",), exclude=("norm",)).select(params, axes)
    with pytest.raises(ValueError, match="frozen_dtype='int8'"):
        trainable.Spec(frozen_dtype="int8")
    with pytest.raises(ValueError, match="not a regular expression"):
        trainable.Spec(paths=("(",))


def _run(config, spec, steps=2):
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    parts = state_lib.ModelParts(lambda: registry.build_model(CFG, rngs=nnx.Rngs(0)), mesh, rules, trainable=spec)
    tx, schedule = optimizer.make_optimizer(config.optimizer, int(config.train.num_steps))
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    if parts.has_base:
        state = state.replace(frozen={"base": state_lib.init_base(parts, mesh)})
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh):
        for seed in range(steps):
            state, _ = train_step(state, partitioning.global_batch(train_fakes.packed_batch(seed, length=16), batch_sharding))
    return parts, state


def test_partial_fine_tuning_trains_the_selection_as_full_fine_tuning_would():
    """Without clipping (a norm over other parameters) and weight decay, a step updates the selected
    parameters exactly as full fine-tuning does; the others stay where they were."""
    config = train_fakes.tiny_config()
    config.optimizer.clip_norm = 0.0
    config.optimizer.weight_decay = 0.0
    _, full = _run(config, None, steps=1)
    _, initial = _run(config, None, steps=0)
    spec = trainable.Spec(paths=(r"attn/(q|k|v|o)/kernel$", "final_norm"))
    parts, partial = _run(config, spec, steps=1)
    full_flat = traversals.flatten_mapping(full.params)
    initial_flat = traversals.flatten_mapping(initial.params)
    trained = traversals.flatten_mapping(partial.params)
    assert set(trained) == set(parts.selection.trained) and len(trained) == 9
    for path, value in trained.items():
        np.testing.assert_allclose(np.asarray(value), np.asarray(full_flat[path]), rtol=1e-6, atol=1e-7, err_msg=str(path))
        assert not np.array_equal(np.asarray(value), np.asarray(initial_flat[path]))
    base = traversals.flatten_mapping(partial.frozen["base"])
    assert set(base) == set(full_flat) - set(trained)
    for path, value in base.items():
        np.testing.assert_array_equal(np.asarray(value), np.asarray(initial_flat[path]))
    # Optimizer state exists for the trained parameters only.
    assert set(traversals.flatten_mapping(optax.tree_utils.tree_get(partial.opt_state, "mu"))) == set(trained)


def test_frozen_weights_count_no_weight_gradient_in_the_flops():
    """MFU's numerator: 6 FLOPs per token for a trained matmul weight, 4 for a frozen one."""
    from flan_jax.model import lora
    from flan_jax.train import loop, metrics

    config = train_fakes.tiny_config()
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    build = lambda: registry.build_model(CFG, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=2))  # noqa: E731
    full = state_lib.ModelParts(build, mesh, partitioning.axis_rules(config.mesh))
    split = state_lib.ModelParts(build, mesh, partitioning.axis_rules(config.mesh), trainable=trainable.Spec(lora=True))
    n_all = metrics.matmul_param_count(full.abstract_params, full.logical_axes, tied_embeddings=False)
    n_adapters = sum(int(np.prod(v.shape)) for v in jax.tree.leaves(split.trained_abstract))
    attention = metrics.flops_per_token(CFG, 0, 16)
    data = ml_collections.ConfigDict({"seq_len": 16})
    assert loop.training_flops_per_token(full, CFG, data) == 6 * n_all + attention
    assert loop.training_flops_per_token(split, CFG, data) == 6 * n_adapters + 4 * (n_all - n_adapters) + attention
