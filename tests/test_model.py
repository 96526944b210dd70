"""The transformer: packing isolation, prefix-LM, padding, attention paths, axes, dtypes, remat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flan_jax import default_config, sharding
from flan_jax import model as fm

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_positions=64)


def tiny(family: str = "llama", **overrides) -> fm.ModelConfig:
    return fm.ModelConfig.for_family(family, **{**TINY, "attention": "reference", **overrides})


def make(cfg: fm.ModelConfig, seed: int = 0) -> fm.Transformer:
    return fm.Transformer(cfg, rngs=nnx.Rngs(seed))


@nnx.jit
def forward(model, tokens, positions=None, segment_ids=None, prefix_mask=None):
    """The model's forward pass, jitted: one compile per shape beats op-by-op dispatch on CPU."""
    return model(tokens, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask)


def packed_row(lengths: list[int], total: int, seed: int = 0):
    """One packed row of random tokens: segments 1..n with restarting positions, then padding."""
    rng = np.random.default_rng(seed)
    tokens = np.zeros((1, total), np.int32)
    segments = np.zeros((1, total), np.int32)
    positions = np.zeros((1, total), np.int32)
    start = 0
    for i, n in enumerate(lengths):
        tokens[0, start:start + n] = rng.integers(1, TINY["vocab_size"], n)
        segments[0, start:start + n] = i + 1
        positions[0, start:start + n] = np.arange(n)
        start += n
    return tokens, positions, segments


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_packed_segments_equal_separate_sequences(family):
    # Mistral with a window shorter than a segment also checks the sliding window mask.
    cfg = tiny(family, sliding_window=4 if family == "mistral" else 0)
    model = make(cfg)
    lengths = [5, 7, 3]
    tokens, positions, segments = packed_row(lengths, total=18)
    packed = forward(model, jnp.asarray(tokens), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    assert packed.dtype == jnp.float32 and packed.shape == (1, 18, TINY["vocab_size"])
    assert np.isfinite(np.asarray(packed)).all(), "padding tokens must not produce NaN/inf"
    start = 0
    for n in lengths:
        alone = forward(model, jnp.asarray(tokens[:, start:start + n]))
        np.testing.assert_allclose(packed[:, start:start + n], alone, atol=1e-5, rtol=1e-5)
        start += n


def test_sliding_window_changes_attention():
    tokens, positions, segments = packed_row([12], total=12)
    full = forward(make(tiny("mistral")), jnp.asarray(tokens))
    windowed = forward(make(tiny("mistral", sliding_window=4)), jnp.asarray(tokens))
    np.testing.assert_allclose(full[:, :4], windowed[:, :4], atol=1e-6)
    assert np.abs(np.asarray(full[:, 4:] - windowed[:, 4:])).max() > 1e-4


def test_causal_and_prefix_lm_visibility():
    model = make(tiny())
    tokens = jnp.asarray(np.arange(1, 9, dtype=np.int32)[None])
    changed = tokens.at[0, 2].set(40)  # change token 2 only
    prefix = jnp.asarray([[1, 1, 1, 1, 0, 0, 0, 0]])

    causal_a, causal_b = forward(model, tokens), forward(model, changed)
    np.testing.assert_allclose(causal_a[:, :2], causal_b[:, :2], atol=1e-6)  # the past cannot see the future

    prefix_a = forward(model, tokens, prefix_mask=prefix)
    prefix_b = forward(model, changed, prefix_mask=prefix)
    # Inside the prefix, earlier tokens now see token 2 ...
    assert np.abs(np.asarray(prefix_a[:, :2] - prefix_b[:, :2])).max() > 1e-4
    # ... but a change after the prefix is still invisible to the prefix.
    late = tokens.at[0, 6].set(40)
    np.testing.assert_allclose(prefix_a[:, :6], forward(model, late, prefix_mask=prefix)[:, :6], atol=1e-6)


def test_prefix_does_not_cross_segments():
    model = make(tiny())
    tokens, positions, segments = packed_row([4, 4], total=8)
    prefix = jnp.ones((1, 8), jnp.int32)
    args = dict(positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments), prefix_mask=prefix)
    out = forward(model, jnp.asarray(tokens), **args)
    other = tokens.copy()
    other[0, 5] = 1 if other[0, 5] != 1 else 2  # a token of segment 2
    np.testing.assert_allclose(out[:, :4], forward(model, jnp.asarray(other), **args)[:, :4], atol=1e-6)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_xla_attention_matches_reference(family):
    tokens, positions, segments = packed_row([6, 5], total=14, seed=3)
    args = dict(positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
    ref = forward(make(tiny(family)), jnp.asarray(tokens), **args)
    xla = forward(make(tiny(family, attention="xla")), jnp.asarray(tokens), **args)
    np.testing.assert_allclose(ref, xla, atol=1e-5, rtol=1e-5)


def test_all_padding_row_is_finite():
    model = make(tiny(attention="xla"))
    zeros = jnp.zeros((2, 8), jnp.int32)
    out = forward(model, zeros, positions=zeros, segment_ids=zeros)
    assert np.isfinite(np.asarray(out)).all()


@pytest.mark.parametrize("family", fm.FAMILIES)
def test_every_param_has_known_logical_axes(family):
    model = make(tiny(family))
    state = nnx.state(model, nnx.Param)
    axes = fm.logical_axes(model)
    known = {name for name, _ in sharding.DEFAULT_RULES}
    pairs = jax.tree.leaves(
        jax.tree.map(lambda names, p: (names, p.shape), axes, state, is_leaf=lambda x: isinstance(x, tuple))
        , is_leaf=lambda x: isinstance(x, tuple) and len(x) == 2 and isinstance(x[1], tuple))
    assert len(pairs) == len(jax.tree.leaves(state))
    for names, shape in pairs:
        assert len(names) == len(shape)
        assert set(names) <= known, names
    # Every spec resolves against the default rules on a real mesh.
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    for names, shape in pairs:
        sharding.named_sharding(mesh, names, sharding.DEFAULT_RULES, shape)


def test_param_count_matches_config():
    for family in fm.FAMILIES:
        cfg = tiny(family, tie_embeddings=family == "qwen2")
        model = make(cfg)
        assert sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param))) == cfg.num_params


def test_bf16_compute_fp32_params():
    tokens, positions, segments = packed_row([8], total=8)
    fp32 = forward(make(tiny(attention="xla")), jnp.asarray(tokens))
    model = make(tiny(attention="xla", dtype="bfloat16"))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    bf16 = forward(model, jnp.asarray(tokens))
    assert bf16.dtype == jnp.float32
    np.testing.assert_allclose(bf16, fp32, atol=3e-2)
    half_params = make(tiny(param_dtype="bfloat16", dtype="bfloat16"))
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(nnx.state(half_params, nnx.Param)))


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_gives_same_gradients(remat):
    tokens, positions, segments = packed_row([5, 6], total=12)

    def loss(model):
        logits = model(jnp.asarray(tokens), positions=jnp.asarray(positions), segment_ids=jnp.asarray(segments))
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    plain = jax.jit(nnx.grad(loss))(make(tiny()))
    rematted = jax.jit(nnx.grad(loss))(make(tiny(remat=remat)))
    for a, b in zip(jax.tree.leaves(plain), jax.tree.leaves(rematted)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_sharded_forward_matches_single_device():
    cfg = tiny(attention="xla")
    model = make(cfg)
    tokens, positions, segments = packed_row([7, 9], total=16)
    batch = [jnp.asarray(np.repeat(a, 4, axis=0)) for a in (tokens, positions, segments)]
    expected = forward(model, batch[0], positions=batch[1], segment_ids=batch[2])

    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    graphdef, state = nnx.split(model)
    axes = fm.logical_axes(model)
    shardings = jax.tree.map(
        lambda names, p: sharding.named_sharding(mesh, names, sharding.DEFAULT_RULES, p.shape),
        axes, nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, tuple))
    state = jax.device_put(state, shardings)

    @jax.jit
    def sharded_forward(state, tokens, positions, segments):
        with sharding.use_rules(mesh, sharding.DEFAULT_RULES):
            return nnx.merge(graphdef, state)(tokens, positions=positions, segment_ids=segments)

    with jax.set_mesh(mesh):
        got = sharded_forward(state, *batch)
    np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_bf16_gradients_sharded_and_rematted_equal_single_device():
    """The bf16 custom backward passes (dense_dot, attention core) under a (2, 2, 2) mesh and remat."""
    tokens, positions, segments = packed_row([7, 9], total=16)
    batch = [jnp.asarray(np.repeat(a, 4, axis=0)) for a in (tokens, positions, segments)]

    def loss(model, tokens, positions, segments):
        logits = model(tokens, positions=positions, segment_ids=segments)
        return jnp.mean(jax.nn.log_softmax(logits)[..., 3])

    def param_grads(cfg, mesh=None):
        model = make(cfg)
        graphdef, state = nnx.split(model)

        @jax.jit
        def grads(state, *batch):
            with sharding.use_rules(mesh, sharding.DEFAULT_RULES) if mesh else _no_rules():
                return jax.grad(lambda s: loss(nnx.merge(graphdef, s), *batch))(state)

        if mesh is None:
            return grads(state, *batch)
        axes = fm.logical_axes(model)
        shardings = jax.tree.map(
            lambda names, p: sharding.named_sharding(mesh, names, sharding.DEFAULT_RULES, p.shape),
            axes, nnx.state(model, nnx.Param), is_leaf=lambda x: isinstance(x, tuple))
        with jax.set_mesh(mesh):
            return grads(jax.device_put(state, shardings), *batch)

    cfg = tiny(attention="xla", dtype="bfloat16")
    expected = param_grads(cfg)
    mesh = jax.make_mesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(jax.sharding.AxisType.Auto,) * 3)
    for got in (param_grads(cfg, mesh), param_grads(tiny(attention="xla", dtype="bfloat16", remat="dots"))):
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
            assert a.dtype == jnp.float32  # float32 params get float32 gradients
            # Activation gradients are bf16, so another reduction order moves a value by a bf16 ulp
            # or two (0.4-0.8%); a wrong gradient is off by O(1).
            np.testing.assert_allclose(a, b, atol=1e-2 * float(np.max(np.abs(b))) + 1e-6)


def _no_rules():
    import contextlib

    return contextlib.nullcontext()


def test_config_constructors_and_validation():
    config = default_config.get_config()
    cfg = fm.ModelConfig.from_config(config.model)
    assert (cfg.family, cfg.d_model, cfg.n_layers, cfg.vocab_size) == ("llama", 256, 4, 8000)
    config.model.family = "gemma"
    gemma = fm.ModelConfig.from_config(config.model)
    assert gemma.embed_scale and gemma.norm_scale_plus_one and gemma.tie_embeddings
    assert fm.ModelConfig.from_dict(gemma.to_dict()) == gemma
    runtime = cfg.with_runtime({"dtype": "bfloat16", "param_dtype": "float32", "remat": "dots", "attention": "xla"})
    assert (runtime.dtype, runtime.remat, runtime.d_model) == ("bfloat16", "dots", 256)
    with pytest.raises(ValueError, match="family"):
        fm.ModelConfig.for_family("bert")
    with pytest.raises(ValueError, match="n_kv_heads"):
        fm.ModelConfig(n_heads=4, n_kv_heads=3)
    with pytest.raises(ValueError, match="attention"):
        fm.ModelConfig(attention="flash")


def test_bf16_norm_scale_gradient_is_a_float32_reduction():
    """The norm's scale gradient sums over every token; in float32 it stays within 0.5% of float64."""
    cfg = tiny(dtype="bfloat16")
    norm = fm.transformer.Norm(cfg, nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (8, 512, cfg.d_model))
    g = jax.random.normal(jax.random.key(2), (8, 512, cfg.d_model)).astype(jnp.bfloat16)
    got = jax.jit(nnx.grad(lambda n: jnp.sum(n(x).astype(jnp.float32) * g.astype(jnp.float32))))(norm).scale[...]
    x64 = np.asarray(x, np.float64)
    y = x64 / np.sqrt(np.mean(x64**2, axis=-1, keepdims=True) + cfg.norm_eps)
    expected = np.sum(y * np.asarray(g, np.float64), axis=(0, 1))
    np.testing.assert_allclose(got, expected, atol=5e-3 * np.abs(expected).max())


@pytest.mark.parametrize("rope_scaling", ["none", "llama3"])
def test_rope_backward_is_the_inverse_rotation(rope_scaling):
    """The CPU kernel's hand-written RoPE gradient equals autodiff of the rotation, on packed positions."""
    from flan_jax.model import transformer
    from flan_jax.model.kernels import rope

    cfg = fm.ModelConfig.for_family("llama", vocab_size=64, d_model=32, n_heads=2, n_kv_heads=2, head_dim=16,
                                    max_positions=64, rope_scaling=rope_scaling)
    positions = jnp.asarray(np.concatenate([np.arange(20), np.arange(12)])[None].repeat(2, axis=0), jnp.int32)
    cos, sin = transformer.rope_angles(positions, cfg)
    x = jax.random.normal(jax.random.key(0), (2, 32, 2, 16))
    weights = jax.random.normal(jax.random.key(1), x.shape)
    got = jax.grad(lambda x: jnp.sum(rope.apply(x, cos, sin, "cpu") * weights))(x)
    expected = jax.grad(lambda x: jnp.sum(rope.apply(x, cos, sin, "xla") * weights))(x)
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_rope_tables_are_evaluated_once_per_step():
    """With the CPU kernels, cos/sin are computed into one buffer each, not re-evaluated inside every consumer.

    XLA's CPU fusion used to copy the float32 cos/sin into each RoPE application (q and k, forward
    and backward, every layer); the training step then spent ~10% of its time in trigonometry.
    """
    cfg = tiny(attention="xla", n_layers=3, kernels="cpu")
    model = make(cfg)
    graphdef, params = nnx.split(model)
    tokens, positions, segments = packed_row([20, 30], 64)

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, positions=positions, segment_ids=segments)
        return jnp.sum(logits)

    hlo = jax.jit(jax.grad(loss)).lower(params).compile().as_text()
    table_cosines = [line for line in hlo.splitlines() if " cosine(" in line and "f32[]" not in line]
    assert len(table_cosines) == 1, table_cosines

    from flan_jax.model import transformer

    cos, sin = transformer.rope_angles(jnp.asarray(positions), cfg)
    angles = np.asarray(positions, np.float32)[..., None] * transformer.rope_inverse_frequencies(cfg)
    angles = np.concatenate([angles, angles], axis=-1)
    np.testing.assert_allclose(cos, np.cos(angles), atol=1e-6)
    np.testing.assert_allclose(sin, np.sin(angles), atol=1e-6)


def test_rope_tables_keep_the_batch_sharding():
    """The tables of a batch-sharded step stay sharded like the batch: no collective, explicit axes too."""
    from jax.sharding import AxisType, NamedSharding, PartitionSpec

    from flan_jax.model import transformer

    mesh = jax.make_mesh((len(jax.devices()),), ("data",), axis_types=(AxisType.Explicit,))
    positions = jax.device_put(jnp.broadcast_to(jnp.arange(64, dtype=jnp.int32), (2 * mesh.size, 64)),
                               NamedSharding(mesh, PartitionSpec("data")))
    tables = jax.jit(lambda p: transformer.rope_angles(p, tiny(kernels="cpu")))
    hlo = tables.lower(positions).compile().as_text()
    assert not [op for op in ("all-gather", "all-to-all", "collective-permute", "all-reduce") if op in hlo]
    cos, _ = tables(positions)
    assert cos.sharding.spec[0] == "data"


@pytest.mark.parametrize("family", ["llama", "gemma"])
def test_gated_mlp_saves_only_its_inputs_and_the_down_projection_input(family, capsys):
    # gated_activation recomputes act(gate) * up in the backward pass: of the d_ff-wide tensors,
    # only gate(x), up(x) and down's input stay as residuals (autodiff of the plain chain adds the
    # activation's intermediates: three more for silu, five for gelu_tanh). Gradients equal the
    # plain chain's.
    from jax import ad_checkpoint

    from flan_jax.model.transformer import MLP, gated_activation

    cfg = tiny(family)
    mlp = MLP(cfg, rngs=nnx.Rngs(0))
    graphdef, params = nnx.split(mlp)
    x = jax.random.normal(jax.random.key(1), (2, 5, cfg.d_model))
    loss = lambda params, x: jnp.sum(jnp.sin(nnx.merge(graphdef, params)(x)))  # noqa: E731
    ad_checkpoint.print_saved_residuals(loss, params, x)
    wide = [line for line in capsys.readouterr().out.splitlines() if f"[2,5,{cfg.d_ff}]" in line]
    assert len(wide) == 3, wide

    gate, up = jax.random.normal(jax.random.key(2), (2, 2, 5, cfg.d_ff))
    act = mlp.activation
    got = jax.grad(lambda g, u: jnp.sum(jnp.sin(gated_activation(act, g, u))), argnums=(0, 1))(gate, up)
    want = jax.grad(lambda g, u: jnp.sum(jnp.sin(act(g) * u)), argnums=(0, 1))(gate, up)
    for a, b in zip(got, want):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(gated_activation(act, None, up), act(up))
