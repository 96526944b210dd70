"""LoRA adapters on the model: step 0 is the base exactly, targets by name / regex / PEFT alias,
clear errors, rsLoRA scale, dropout from the step's key only, merging, stacked-layer layouts, and
through the train step gradients and optimizer state for the adapters only."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from flax.nnx import traversals

from flan_jax import model as fm
from flan_jax.model import lora, registry
from flan_jax.model.transformer import Dense
from flan_jax.train import optimizer, partitioning, state as state_lib, step, trainable
from tests import train_fakes


def _cfg(family="llama", **overrides):
    sizes = dict(vocab_size=32, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=8, d_ff=24, max_positions=16)
    return fm.ModelConfig.for_family(family, **{**sizes, **overrides})


def _tokens(seed=0, shape=(2, 10)):
    return jnp.asarray(np.random.default_rng(seed).integers(1, 32, shape), jnp.int32)


@nnx.jit
def _logits(model, tokens):
    return model(tokens)


def logits(model, tokens) -> np.ndarray:
    return np.asarray(_logits(model, tokens))


@pytest.mark.parametrize("family", ["llama", "gemma", "gpt2"])
def test_step_zero_is_the_base_model_exactly(family):
    cfg = _cfg(family)
    base = registry.build_model(cfg, rngs=nnx.Rngs(0))
    adapted = registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=4, alpha=8.0))
    tokens = _tokens()
    assert np.array_equal(logits(base, tokens), logits(adapted, tokens))  # B = 0: bitwise the base
    # The base's parameters keep their values and paths; adapters sit beside each kernel.
    plain = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(base, nnx.Param)))
    both = traversals.flatten_mapping(nnx.to_pure_dict(nnx.state(adapted, nnx.Param)))
    assert set(plain) <= set(both)
    for path, value in plain.items():
        np.testing.assert_array_equal(np.asarray(both[path]), np.asarray(value))
    extra = sorted(trainable.path_str(p) for p in set(both) - set(plain))
    projections = ["attn/k", "attn/o", "attn/q", "attn/v", "mlp/down", "mlp/up"] + (["mlp/gate"] if cfg.gated_mlp else [])
    assert extra == sorted(f"layers/{i}/{p}/{n}" for i in range(2) for p in projections for n in ("lora_a", "lora_b"))
    q = adapted.layers[0].attn.q
    assert q.lora_a.shape == (16, 4) and q.lora_b.shape == (4, 2, 8)
    assert q.lora_a.get_metadata()["logical_axes"] == ("embed", None)
    assert q.lora_b.get_metadata()["logical_axes"] == (None, "heads", "head_dim")
    assert not np.any(np.asarray(q.lora_b[...])) and np.any(np.asarray(q.lora_a[...]))
    # PEFT's init: A ~ U(-1/sqrt(in), 1/sqrt(in)).
    assert np.abs(np.asarray(q.lora_a[...])).max() <= 1 / np.sqrt(16)


def test_targets_by_name_regex_and_peft_alias_and_scales():
    cfg = _cfg()
    picked = lambda targets: sorted(p for p, _ in lora.adapters(  # noqa: E731
        registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=2, targets=targets))))
    assert picked(("q", "v")) == ["layers/0/attn/q", "layers/0/attn/v", "layers/1/attn/q", "layers/1/attn/v"]
    assert picked(("q_proj", "down_proj")) == picked(("q", "down"))
    assert picked((r"layers/1/mlp/(gate|up)$",)) == ["layers/1/mlp/gate", "layers/1/mlp/up"]
    assert len(picked(("all-linear",))) == 14
    assert lora.LoRAConfig(rank=16, alpha=32.0).scale == 2.0
    assert lora.LoRAConfig(rank=16, alpha=32.0, rslora=True).scale == 8.0


def test_bad_lora_settings_are_named():
    cfg = _cfg()
    with pytest.raises(lora.LoRAError, match=r"\['qkv'\] match no projection.*names \['down', 'gate', 'k', 'o', 'q', 'up', 'v'\]"
                                             r".*layers/\*/attn/k, layers/\*/attn/o"):
        registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=2, targets=("q", "qkv")))
    with pytest.raises(lora.LoRAError, match=r"rank=9 is larger than projection layers/0/attn/k's dimensions \(in 16, out 8"):
        registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=9, targets=("k",)))
    for bad in (dict(rank=0), dict(rank=2, alpha=0.0), dict(rank=2, dropout=1.0), dict(rank=2, targets=())):
        with pytest.raises(lora.LoRAError):
            lora.LoRAConfig(**bad)


def test_dropout_only_in_training_mode_and_from_the_steps_key():
    cfg = _cfg()
    model = registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=4, dropout=0.5))
    adapters = nnx.state(model, nnx.LoRAParam)
    nnx.update(model, jax.tree.map(lambda v: v + 0.3, adapters))  # B != 0, so dropout shows
    tokens = _tokens()
    plain = logits(model, tokens)
    graph, state = nnx.split(model)

    def train_logits(key):
        copy = nnx.merge(graph, state)
        return logits(lora.train_mode(copy, key), tokens)

    one, again, other = train_logits(jax.random.key(1)), train_logits(jax.random.key(1)), train_logits(jax.random.key(2))
    np.testing.assert_array_equal(one, again)
    assert not np.allclose(one, plain) and not np.allclose(one, other)
    np.testing.assert_array_equal(logits(model, tokens), plain)  # evaluation stays deterministic


def test_merged_params_equal_the_adapted_model():
    cfg = _cfg()
    model = registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora.LoRAConfig(rank=3, alpha=5.0, targets=("q", "o", "up")))
    key = jax.random.key(7)
    nnx.update(model, jax.tree.map(lambda v: v + 0.2 * jax.random.normal(key, v.shape), nnx.state(model, nnx.LoRAParam)))
    merged = lora.merged_params(nnx.to_pure_dict(nnx.state(model, nnx.Param)), lora.scales_of(model))
    plain = fm.Transformer(cfg, rngs=nnx.Rngs(5))
    state = nnx.state(plain, nnx.Param)
    nnx.replace_by_pure_dict(state, merged)
    nnx.update(plain, state)
    tokens = _tokens(3)
    np.testing.assert_allclose(logits(plain, tokens), logits(model, tokens), atol=1e-5, rtol=1e-5)


def test_adapters_of_stacked_layers_stack_like_their_kernel():
    """A projection whose kernel carries a leading `layers` axis (scanned layers) gets adapters with
    the same leading axis; layer i of the stack computes what an unstacked LoRADense does."""
    cfg = _cfg()
    rngs = nnx.Rngs(0)
    dense = Dense((16,), (2, 8), ("embed", "heads", "head_dim"), use_bias=False, cfg=cfg, rngs=rngs)
    stacked = jnp.stack([dense.kernel[...] * (i + 1) for i in range(3)])
    dense.kernel = nnx.Param(stacked, logical_axes=("layers", "embed", "heads", "head_dim"))
    adapted = lora.LoRADense(dense, lora.LoRAConfig(rank=4, dropout=0.1), rngs=rngs)
    assert adapted.lora_a.shape == (3, 16, 4) and adapted.lora_b.shape == (3, 4, 2, 8)
    assert adapted.lora_a.get_metadata()["logical_axes"] == ("layers", "embed", None)
    assert adapted.lora_b.get_metadata()["logical_axes"] == ("layers", None, "heads", "head_dim")
    assert adapted.dropout_key.shape[0] == 3
    adapted.lora_b[...] = jax.random.normal(jax.random.key(1), adapted.lora_b.shape)
    x = jax.random.normal(jax.random.key(2), (2, 5, 16))

    def layer(i):  # what a scan over the stack sees: every array of the module sliced at i
        graph, state = nnx.split(adapted)
        return nnx.merge(graph, jax.tree.map(lambda a: a[i], state))

    delta = np.asarray(adapted.delta())
    for i in range(3):
        one = layer(i)
        expected = np.einsum("bld,dhk->blhk", np.asarray(x), np.asarray(stacked[i]) + delta[i])
        np.testing.assert_allclose(np.asarray(one(x)), expected, atol=1e-5, rtol=1e-5)
    keys = lora.train_mode(adapted, jax.random.key(0)).dropout_key[...]
    assert len({tuple(np.asarray(k)) for k in keys}) == 3  # one dropout key per stacked layer


def _lora_setup(config, cfg, lora_cfg, spec):
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    rules = partitioning.axis_rules(config.mesh)
    parts = state_lib.ModelParts(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), lora=lora_cfg), mesh, rules, trainable=spec)
    tx, schedule = optimizer.make_optimizer(config.optimizer, int(config.train.num_steps))
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh).replace(frozen={"base": state_lib.init_base(parts, mesh)})
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    return mesh, rules, parts, state, train_step


def test_lora_train_step_updates_only_adapters_and_keeps_optimizer_state_for_them_only():
    config = train_fakes.tiny_config()
    cfg = _cfg(max_positions=16)
    lora_cfg = lora.LoRAConfig(rank=2, targets=("q", "v", "down"), dropout=0.1)
    mesh, rules, parts, state, train_step = _lora_setup(config, cfg, lora_cfg, trainable.Spec(lora=True, frozen_dtype="bfloat16"))
    adapter_paths = {p for p in traversals.flatten_mapping(parts.abstract_params) if lora.is_adapter_path(p)}
    assert set(traversals.flatten_mapping(state.params)) == adapter_paths
    mu = optax.tree_utils.tree_get(state.opt_state, "mu")
    assert set(traversals.flatten_mapping(mu)) == adapter_paths
    assert {np.dtype(x.dtype) for x in jax.tree.leaves(state.frozen["base"])} == {np.dtype("bfloat16")}
    base_before = jax.tree.map(np.asarray, state.frozen["base"])
    params_before = jax.tree.map(np.asarray, state.params)
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    with jax.set_mesh(mesh):
        for seed in range(2):
            state, metrics = train_step(state, partitioning.global_batch(train_fakes.packed_batch(seed, length=16), batch_sharding))
    assert np.isfinite(metrics["loss"])
    for a, b in zip(jax.tree.leaves(state.frozen["base"]), jax.tree.leaves(base_before)):
        assert np.asarray(a).tobytes() == b.tobytes()  # the base is never updated
    changed = traversals.flatten_mapping(jax.tree.map(lambda a, b: not np.array_equal(np.asarray(a), b), state.params, params_before))
    assert all(changed.values())  # every adapter (A and B) moved
