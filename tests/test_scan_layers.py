"""Scanned (stacked) and unrolled layers: same function, same training, exact layout conversion.

A model built with `scan_layers=True` holds the same numbers as the unrolled one from the same seed
(stacked along a leading layer axis), so every comparison here is between the two layouts of ONE
set of weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flan_jax import model as fm
from flan_jax.convert import checkpoint as converted
from flan_jax.model import generate as gen
from flan_jax.model import layer_stack, layout, transformer
from flan_jax.train import checkpointing, loop, optimizer, partitioning, step, state as state_lib
from tests import train_fakes

TINY = dict(vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_positions=64)


def build(family="llama", scan=False, seed=0, **overrides) -> fm.Transformer:
    cfg = fm.ModelConfig.for_family(family, **{**TINY, "init_std": 0.3, **overrides, "scan_layers": scan})
    return fm.Transformer(cfg, rngs=nnx.Rngs(seed))


def params(model) -> dict:
    return nnx.to_pure_dict(nnx.state(model, nnx.Param))


def assert_trees_equal(a, b) -> None:
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert np.asarray(x).dtype == np.asarray(y).dtype and np.array_equal(np.asarray(x), np.asarray(y))


@nnx.jit
def forward(model, tokens, positions, segment_ids):
    return model(tokens, positions=positions, segment_ids=segment_ids)


def packed_inputs(rows=2, length=16, seed=0):
    batch = train_fakes.packed_batch(seed, rows=rows, length=length, vocab=TINY["vocab_size"])
    return [jnp.asarray(batch[k]) for k in ("input_tokens", "positions", "segment_ids")]


@pytest.mark.parametrize("family,overrides", [
    ("llama", {}), ("mistral", {"sliding_window": 5}), ("gpt2", {}), ("gemma", {}),
    ("llama", {"kernels": "xla"}),  # the plain formulation a GPU/TPU runs
    ("gemma2", {"layer_types": ("sliding", "full", "sliding"), "sliding_window": 4, "kernels": "xla"}),
])
def test_scanned_and_unrolled_hold_the_same_weights_and_give_equal_logits(family, overrides):
    unrolled, scanned = build(family, False, **overrides), build(family, True, **overrides)
    assert isinstance(unrolled.layers, nnx.List) and not isinstance(scanned.layers, nnx.List)
    q = scanned.layers.attn.q.kernel
    assert q.shape == (TINY["n_layers"], 32, 4, 8) and q.logical_axes == ("layers", "embed", "heads", "head_dim")
    assert_trees_equal(layout.stack(params(unrolled)), params(scanned))  # same seed, same numbers
    inputs = packed_inputs()
    np.testing.assert_allclose(np.asarray(forward(scanned, *inputs)), np.asarray(forward(unrolled, *inputs)), rtol=1e-5, atol=1e-5)


def test_a_layer_pattern_scans_in_groups_with_the_remainder_unrolled(monkeypatch):
    """Kinds (window 4, global) repeating over 5 layers: a scan over 2 groups of 2, then 1 layer unrolled."""
    kinds = (transformer.LayerKind(sliding_window=4), transformer.LayerKind(0))
    monkeypatch.setattr(transformer, "layer_kinds", lambda cfg: (kinds * 3)[: cfg.n_layers])
    assert layer_stack.pattern_period((kinds * 3)[:5]) == 2
    unrolled, scanned = build(n_layers=5, scan=False), build(n_layers=5, scan=True)
    inputs = packed_inputs(length=24)
    got = np.asarray(forward(scanned, *inputs))
    np.testing.assert_allclose(got, np.asarray(forward(unrolled, *inputs)), rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(transformer, "layer_kinds", lambda cfg: (kinds[1],) * cfg.n_layers)
    uniform = np.asarray(forward(build(n_layers=5, scan=True), *inputs))
    assert np.abs(got - uniform).max() > 1e-3  # the per-layer windows are really applied

    # The KV-cache generator applies each kind's window too, in both layouts.
    monkeypatch.setattr(transformer, "layer_kinds", lambda cfg: (kinds * 3)[: cfg.n_layers])
    prompts = [[5, 9, 3, 17, 22, 8, 1], [7, 1]]
    a = gen.generate_arrays(build(n_layers=5, scan=True), prompts, max_new_tokens=6, eos_id=63, return_logits=True)
    b = gen.generate_arrays(build(n_layers=5, scan=False), prompts, max_new_tokens=6, eos_id=63, return_logits=True)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family,overrides", [("mistral", {"sliding_window": 4})])
def test_kv_cache_generation_is_the_same_in_both_layouts(family, overrides):
    prompts = [[5, 9, 3, 17, 22], [7, 1], [30, 31, 32, 33, 34, 35, 36, 37, 38]]
    runs = [gen.generate_arrays(build(family, scan, init_std=0.5, **overrides), prompts, max_new_tokens=7,
                                eos_id=63, return_logits=True) for scan in (False, True)]
    np.testing.assert_array_equal(runs[0].tokens, runs[1].tokens)
    np.testing.assert_allclose(runs[0].logits, runs[1].logits, rtol=1e-5, atol=1e-5)
    model = build(family, True)
    keys, values = model.init_cache(2, 16)
    assert keys.shape == values.shape == (TINY["n_layers"], 2, 2, 16, 8)  # [layers, batch, kv heads, slots, head_dim]


def _trainer(scan: bool, remat: str, mesh_shape, n_devices: int, dtype: str = "float32"):
    config = train_fakes.tiny_config()
    config.model.update(vocab_size=32, d_model=16, n_layers=3, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=32,
                        max_positions=8, scan_layers=scan, remat=remat, dtype=dtype)
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = mesh_shape
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:n_devices])
    rules = partitioning.axis_rules(config.mesh)
    _, parts = loop.build_model(config, mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 10)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    return config, mesh, rules, parts, tx, shardings, state, train_step


def _train(trainer, batches):
    config, mesh, rules, _, _, _, state, train_step = trainer
    return train_fakes.run_steps(train_step, state, batches, mesh, rules)


@pytest.mark.parametrize("remat,mesh_shape,n_devices,dtype,tolerance", [
    ("full", (1, 1, 1), 1, "float32", 2e-6), ("none", (2, 2, 2), 8, "bfloat16", 2e-4),
])
def test_train_steps_update_both_layouts_equally(remat, mesh_shape, n_devices, dtype, tolerance):
    """AdamW, 3 steps; remat per scanned layer; sharded over data x fsdp x tensor in bf16 compute.

    bf16 gets a looser tolerance: XLA:CPU fuses a loop body differently from unrolled code, and
    with its fusions moves where the bf16 intermediates are rounded.
    """
    batches = [train_fakes.packed_batch(s) for s in range(3)]
    (state_u, loss_u), (state_s, loss_s) = (
        _train(_trainer(scan, remat, mesh_shape, n_devices, dtype), batches) for scan in (False, True))
    np.testing.assert_allclose(loss_s, loss_u, rtol=10 * tolerance)
    stacked = layout.stack(jax.tree.map(np.asarray, state_u.params))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=10 * tolerance, atol=tolerance),
                 state_s.params, stacked)
    assert state_s.params["layers"]["attn"]["q"]["kernel"].shape[0] == 3
    assert state_s.params["layers"]["attn"]["q"]["kernel"].sharding.spec[0] is None  # the layer axis is replicated


def test_layout_conversion_round_trips_exactly_for_params_optimizer_state_and_abstract_targets():
    trainer = _trainer(True, "none", (2, 2, 2), 8)
    _, _, _, parts, tx, shardings, state, _ = trainer
    host = jax.tree.map(np.asarray, {"params": state.params, "opt_state": state.opt_state})
    unrolled = layout.unstack(host)
    assert layout.is_stacked(host) is True and layout.is_stacked(unrolled) is False
    assert sorted(unrolled["params"]["layers"]) == [0, 1, 2]
    assert_trees_equal(layout.stack(unrolled), host)  # numpy, through AdamW's NamedTuples and MaskedNodes
    assert_trees_equal(layout.to_layout(host, stacked=True), host)  # already stacked: unchanged

    flat = converted.flatten(unrolled["params"])
    assert_trees_equal(converted.nest(layout.stack_flat(dict(flat))), host["params"])

    abstract = state_lib.abstract_state(parts, tx, shardings, seed=0)
    per_layer = layout.unstack(abstract.params)["layers"][1]["mlp"]["up"]["kernel"]
    stacked = abstract.params["layers"]["mlp"]["up"]["kernel"]
    assert per_layer.shape == stacked.shape[1:] and tuple(per_layer.sharding.spec) == tuple(stacked.sharding.spec)[1:]
    # Placed conversion (on the devices, into the target shardings) of jax arrays, both ways.
    back = layout.to_layout_placed(layout.to_layout(state.params, stacked=False), abstract.params)
    assert_trees_equal(jax.tree.map(np.asarray, back), host["params"])
    assert back["layers"]["mlp"]["up"]["kernel"].sharding == stacked.sharding

    # A frozen slot's fingerprint (checked on resume) does not depend on the layout.
    unrolled_params = layout.to_layout(state.params, stacked=False)
    assert state_lib.fingerprint(state.params) == state_lib.fingerprint(unrolled_params)
    changed = {**unrolled_params, "layers": {**unrolled_params["layers"], 2: jax.tree.map(lambda x: x + 1, unrolled_params["layers"][2])}}
    assert state_lib.fingerprint(changed) != state_lib.fingerprint(unrolled_params)


@pytest.mark.parametrize("saved_scan", [False, True])
def test_a_checkpoint_restores_into_the_other_layout(tmp_path, saved_scan):
    """Resume (params + AdamW state), `load_model` and `init_from` across layouts, then train on equally."""
    batches = [train_fakes.packed_batch(s) for s in range(2)]
    saver, other = _trainer(saved_scan, "none", (1, 2, 1), 2), _trainer(not saved_scan, "none", (1, 2, 1), 2)
    config = saver[0]
    state, _ = _train(saver, batches[:1])
    _, mesh, _, parts, tx, shardings, _, train_step = other
    restored = train_fakes.save_then_restore(tmp_path, state, config, state_lib.abstract_state(parts, tx, shardings, seed=0))
    expected = layout.to_layout(jax.tree.map(np.asarray, {"params": state.params, "opt_state": state.opt_state}), stacked=not saved_scan)
    assert_trees_equal(jax.tree.map(np.asarray, {"params": restored.params, "opt_state": restored.opt_state}), expected)
    assert restored.params["embed"].sharding == shardings.params["embed"]

    # load_model builds the model its config describes; here the config says the other layout.
    ckpt_config = config.copy_and_resolve_references()
    ckpt_config.model.scan_layers = not saved_scan
    ckpt = checkpointing.Checkpointer(tmp_path / "flipped", config.checkpoint)
    ckpt.save(1, state, train_fakes.counting_iterator(), ckpt_config)
    ckpt.close()
    model, _, _ = checkpointing.load_model(tmp_path / "flipped")
    assert model.cfg.scanned == (not saved_scan)
    assert_trees_equal(jax.tree.map(np.asarray, params(model)), expected["params"])

    # checkpoint.init_from: a converted folder (stored per layer) loads into either layout.
    cfg = fm.ModelConfig.from_config(config.model)
    converted.save_converted(tmp_path / "converted", cfg, state.params)
    placed = loop.load_init_params(str(tmp_path / "converted"), parts, fm.ModelConfig.from_config(other[0].model))
    assert_trees_equal(jax.tree.map(np.asarray, placed), expected["params"])
    _, stacked_params = converted.load_converted(tmp_path / "converted", stacked=True)
    assert layout.is_stacked(nnx.to_pure_dict(stacked_params)) is True

    # Training on from the restored state equals training on in the saved layout (states are donated).
    continued, _ = _train((*other[:6], restored, train_step), batches[1:])
    reference, _ = _train((*saver[:6], state, saver[7]), batches[1:])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), b, rtol=2e-5, atol=2e-6), continued.params,
                 layout.to_layout(jax.tree.map(np.asarray, reference.params), stacked=not saved_scan))


def test_scan_default_follows_the_measurements_and_the_matmul_count_ignores_the_layer_axis():
    from flan_jax.model.config import SCAN_MIN_LAYERS, default_scan_layers
    from flan_jax.train import metrics

    shallow, deep = fm.ModelConfig(n_layers=SCAN_MIN_LAYERS - 1), fm.ModelConfig(n_layers=SCAN_MIN_LAYERS)
    for backend in ("cpu", "gpu", "tpu"):
        assert not default_scan_layers(shallow, backend) and default_scan_layers(deep, backend)
        assert default_scan_layers(deep.replace(dtype="bfloat16", remat="full"), backend)
    # bf16 without remat: unrolled on CPU only (XLA:CPU's backward of a scanned bf16 step is slow).
    assert not default_scan_layers(deep.replace(dtype="bfloat16"), "cpu")
    assert default_scan_layers(deep.replace(dtype="bfloat16"), "gpu")
    assert deep.scanned == default_scan_layers(deep, jax.default_backend())
    assert fm.ModelConfig(n_layers=2, scan_layers=True).scanned and not fm.ModelConfig(n_layers=40, scan_layers=False).scanned
    with pytest.raises(ValueError, match="scan_layers"):
        fm.ModelConfig(scan_layers="yes")
    counts = []
    for scan in (False, True):
        model = build(scan=scan)
        state = nnx.state(model, nnx.Param)
        counts.append(metrics.matmul_param_count(nnx.to_pure_dict(state), partitioning.param_logical_axes(state), tied_embeddings=False))
    assert counts[0] == counts[1] > 0
