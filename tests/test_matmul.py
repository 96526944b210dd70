"""`dense_dot`: float32 accumulation in all three matmuls, gradients in the parameter dtype."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.model.kernels.matmul import dense_dot


def _inputs(in_shape, out_shape):
    kx, kw, kg = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (3, 5, *in_shape))
    kernel = jax.random.normal(kw, (*in_shape, *out_shape)) * 0.1
    out_weights = jax.random.normal(kg, (3, 5, *out_shape))
    return x, kernel, out_weights


@pytest.mark.parametrize("in_shape,out_shape", [((8,), (4, 6)), ((4, 6), (16,))])
def test_float32_values_and_gradients_equal_autodiff_of_tensordot(in_shape, out_shape):
    x, kernel, out_weights = _inputs(in_shape, out_shape)
    n_in = len(in_shape)
    np.testing.assert_allclose(dense_dot(x, kernel, n_in, jnp.float32), jnp.tensordot(x, kernel, axes=n_in), rtol=1e-6, atol=1e-6)
    got = jax.grad(lambda x, k: jnp.sum(dense_dot(x, k, n_in, jnp.float32) * out_weights), argnums=(0, 1))(x, kernel)
    want = jax.grad(lambda x, k: jnp.sum(jnp.tensordot(x, k, axes=n_in) * out_weights), argnums=(0, 1))(x, kernel)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("in_shape,out_shape", [((16,), (24,)), ((16,), (4, 6)), ((4, 6), (16,))])
def test_bf16_values_and_gradients_match_float32(in_shape, out_shape):
    x, kernel, out_weights = _inputs(in_shape, out_shape)
    n_in = len(in_shape)

    def objective(dtype):
        return lambda x, kernel: jnp.sum(dense_dot(x, kernel, n_in, dtype).astype(jnp.float32) * out_weights)

    y = dense_dot(x, kernel, n_in, jnp.bfloat16)
    assert y.dtype == jnp.bfloat16 and y.shape == (3, 5, *out_shape)
    np.testing.assert_allclose(y.astype(jnp.float32), jnp.tensordot(x, kernel, axes=n_in), atol=0.05, rtol=0.02)

    (dx, dkernel), (dx32, dkernel32) = (jax.grad(objective(d), argnums=(0, 1))(x, kernel) for d in (jnp.bfloat16, jnp.float32))
    # The input gradient comes back in the input's dtype; the kernel's in the parameter dtype,
    # never rounded through bf16.
    assert dx.dtype == jnp.float32 and dkernel.dtype == jnp.float32
    for got, want in ((dx, dx32), (dkernel, dkernel32)):
        np.testing.assert_allclose(got, want, atol=0.02 * float(jnp.max(jnp.abs(want))))


def test_bf16_kernel_gradient_keeps_bf16_params():
    x, kernel, out_weights = _inputs((16,), (8,))
    kernel = kernel.astype(jnp.bfloat16)
    grad = jax.grad(lambda k: jnp.sum(dense_dot(x, k, 1, jnp.bfloat16).astype(jnp.float32) * out_weights))(kernel)
    assert grad.dtype == jnp.bfloat16
