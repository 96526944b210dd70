"""The training attention path that skips masked blocks equals plain masked attention."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.model import transformer


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
        got = transformer.causal_block_attention(q, k, v, mask, block=block)
        np.testing.assert_allclose(got, expected, atol=1e-6, rtol=1e-6)


def test_causal_model_path_matches_reference_model():
    """The whole model with attention="xla" (block path) vs "reference" on one batch."""
    from flax import nnx

    from flan_jax import model as fm

    shape = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_positions=64)
    tokens = jnp.asarray(np.random.default_rng(0).integers(1, 64, (2, 64)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 40 + [2] * 24], 2, axis=0), jnp.int32)
    old = transformer.CAUSAL_BLOCK
    transformer.CAUSAL_BLOCK = 16  # several blocks at this tiny length
    try:
        outs = {}
        for attention in ("xla", "reference"):
            cfg = fm.ModelConfig.for_family("llama", **shape, attention=attention)
            model = fm.Transformer(cfg, rngs=nnx.Rngs(0))
            outs[attention] = jax.jit(lambda t, s, m=model: m(t, segment_ids=s))(tokens, segments)
    finally:
        transformer.CAUSAL_BLOCK = old
    np.testing.assert_allclose(outs["xla"], outs["reference"], atol=1e-5, rtol=1e-5)
