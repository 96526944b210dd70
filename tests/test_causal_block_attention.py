"""The training attention path that skips masked blocks equals plain masked attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.model import transformer
from flan_jax.model.kernels import causal_attention


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """Exact float32 matmuls also on GPUs, whose default for float32 is TF32 (~1e-3 relative)."""
    with jax.default_matmul_precision("float32"):
        yield


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_causal_block_attention_matches_reference_with_packing(n_kv_heads):
    b, t, h, d = 2, 48, 4, 8
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (b, t, h, d))
    k = jax.random.normal(kk, (b, t, n_kv_heads, d))
    v = jax.random.normal(kv, (b, t, n_kv_heads, d))
    # Packed rows: segment boundaries inside blocks and across them, trailing padding.
    segments = np.ones((b, t), np.int32)
    segments[0, 10:30], segments[0, 30:] = 2, 3
    segments[1, 20:40], segments[1, 40:] = 2, 0
    mask = transformer.attention_mask(jnp.asarray(segments))
    expected = transformer.reference_attention(q, k, v, mask)
    for block in (8, 16, 24):
        got = jax.jit(causal_attention.causal_block_attention, static_argnames="block")(q, k, v, mask, block=block)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_causal_model_path_matches_reference_model():
    """The whole model with attention="xla" (block path) vs "reference" on one batch."""
    from flax import nnx

    from flan_jax import model as fm

    shape = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_positions=64)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 64)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 40 + [2] * 24], 2, axis=0), jnp.int32)
    old = causal_attention.CAUSAL_BLOCK
    causal_attention.CAUSAL_BLOCK = 16  # several blocks at this tiny length
    try:
        outs = {}
        for attention in ("xla", "reference"):
            cfg = fm.ModelConfig.for_family("llama", **shape, attention=attention)
            model = fm.Transformer(cfg, rngs=nnx.Rngs(0))
            outs[attention] = jax.jit(lambda t, s, m=model: m(t, segment_ids=s))(tokens, segments)
    finally:
        causal_attention.CAUSAL_BLOCK = old
    np.testing.assert_allclose(outs["xla"], outs["reference"], atol=1e-5, rtol=1e-5)


def _packed_inputs(n_kv_heads, dtype=jnp.float32):
    b, t, h, d = 2, 48, 4, 8
    kq, kk, kv, kw = jax.random.split(jax.random.key(1), 4)
    q = jax.random.normal(kq, (b, t, h, d), dtype)
    k = jax.random.normal(kk, (b, t, n_kv_heads, d), dtype)
    v = jax.random.normal(kv, (b, t, n_kv_heads, d), dtype)
    out_weights = jax.random.normal(kw, (b, t, h, d))
    segments = np.ones((b, t), np.int32)
    segments[0, 10:30], segments[0, 30:] = 2, 3
    segments[1, 20:40], segments[1, 40:] = 2, 0
    return q, k, v, transformer.attention_mask(jnp.asarray(segments)), out_weights


@pytest.mark.parametrize("n_kv_heads", [4, 2])
def test_causal_block_attention_gradients_match_reference(n_kv_heads):
    """The hand-written attention backward pass equals autodiff of plain masked attention."""
    q, k, v, mask, out_weights = _packed_inputs(n_kv_heads)

    def objective(attention, **kw):
        return lambda q, k, v: jnp.sum(attention(q, k, v, mask, **kw).astype(jnp.float32) * out_weights)

    expected = jax.jit(jax.grad(objective(transformer.reference_attention), argnums=(0, 1, 2)))(q, k, v)
    for block in (16, 48):
        got = jax.jit(jax.grad(objective(causal_attention.causal_block_attention, block=block), argnums=(0, 1, 2)))(q, k, v)
        for name, g, e in zip("qkv", got, expected):
            np.testing.assert_allclose(g, e, atol=2e-5, rtol=2e-5, err_msg=f"d{name}, block {block}")


def test_causal_block_attention_bf16_gradients_stay_close_to_float32():
    """In bf16 every matmul accumulates in float32: gradients within bf16 rounding of float32's."""
    q, k, v, mask, out_weights = _packed_inputs(2)

    def grads(dtype):
        def objective(q, k, v):
            out = causal_attention.causal_block_attention(q, k, v, mask, block=16)
            return jnp.sum(out.astype(jnp.float32) * out_weights)

        return jax.jit(jax.grad(objective, argnums=(0, 1, 2)))(*(x.astype(dtype) for x in (q, k, v)))

    for name, low, high in zip("qkv", grads(jnp.bfloat16), grads(jnp.float32)):
        assert low.dtype == jnp.bfloat16
        scale = float(jnp.max(jnp.abs(high)))
        np.testing.assert_allclose(low.astype(jnp.float32), high, atol=0.02 * scale, err_msg=f"d{name}")
