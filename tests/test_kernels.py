"""config.model.kernels: the CPU kernels and the plain XLA formulation compute the same model."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flan_jax import default_config
from flan_jax import model as fm
from flan_jax.model import kernels
from flan_jax.model.kernels import causal_attention

SHAPE = dict(vocab_size=64, d_model=32, n_layers=1, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_positions=64)


def test_auto_takes_the_cpu_kernels_on_cpu_only():
    assert [kernels.resolve("auto", p) for p in ("cpu", "gpu", "cuda", "tpu")] == ["cpu", "xla", "xla", "xla"]
    assert kernels.resolve("xla", "cpu") == "xla" and kernels.resolve("cpu", "tpu") == "cpu"
    with pytest.raises(ValueError, match="config.model.kernels='fast'"):
        kernels.resolve("fast")
    with pytest.raises(ValueError, match="ModelConfig.kernels='fast'"):
        fm.ModelConfig(kernels="fast")
    config = default_config.get_config()
    assert config.model.kernels == "auto" and fm.ModelConfig.from_config(config.model).kernels == "auto"


def _loss_and_grads(dtype: str, choice: str, batch):
    cfg = fm.ModelConfig.for_family("llama", **SHAPE, attention="xla", dtype=dtype, kernels=choice)
    graphdef, params = nnx.split(fm.Transformer(cfg, rngs=nnx.Rngs(0)))
    tokens, segments, weights = batch

    def loss(params):
        logits = nnx.merge(graphdef, params)(tokens, segment_ids=segments)
        return jnp.sum(logits * weights)

    return jax.jit(jax.value_and_grad(loss))(params), jax.make_jaxpr(loss)(params)


@pytest.fixture(scope="module")
def batch():
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(1, 64, (2, 48)), jnp.int32)
    segments = jnp.asarray(np.repeat([[1] * 30 + [2] * 14 + [0] * 4], 2, axis=0), jnp.int32)
    weights = jnp.asarray(rng.standard_normal((2, 48, 64)), jnp.float32)
    return tokens, segments, weights


@pytest.mark.parametrize("dtype,tolerance", [("float32", 1e-5), ("bfloat16", 3e-2)])
def test_cpu_and_xla_kernels_give_the_same_values_and_gradients(monkeypatch, batch, dtype, tolerance):
    """Causal packed rows over several attention blocks, forward and backward, both compute dtypes."""
    monkeypatch.setattr(causal_attention, "CAUSAL_BLOCK", 16)
    with jax.default_matmul_precision("float32"):
        ((loss_cpu, grads_cpu), jaxpr_cpu), ((loss_xla, grads_xla), jaxpr_xla) = (
            _loss_and_grads(dtype, choice, batch) for choice in ("cpu", "xla")
        )
    # The plain formulation really is plain (autodiff only); the CPU one runs the written VJPs.
    assert "custom_vjp_call" in str(jaxpr_cpu) and "custom_vjp_call" not in str(jaxpr_xla)
    np.testing.assert_allclose(loss_cpu, loss_xla, rtol=tolerance)
    for got, want in zip(jax.tree.leaves(grads_cpu), jax.tree.leaves(grads_xla)):
        assert got.dtype == want.dtype == jnp.float32
        np.testing.assert_allclose(got, want, atol=tolerance * float(jnp.max(jnp.abs(want))))
