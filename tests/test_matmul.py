"""`dense_dot`: float32 accumulation in all three matmuls, gradients in the parameter dtype.

`lora_dense_dot`: the merged-kernel LoRA projection equals the unmerged form, values and every
gradient, and builds only the gradients that are asked for."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.model.kernels.matmul import dense_dot, lora_dense_dot


@pytest.fixture(autouse=True)
def _float32_matmuls():
    """Exact float32 matmuls also on GPUs, whose default for float32 is TF32 (~1e-3 relative): the
    merged and unmerged LoRA forms round differently under TF32."""
    with jax.default_matmul_precision("float32"):
        yield


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


def _lora_inputs(in_shape, out_shape, rank=3):
    x, kernel, out_weights = _inputs(in_shape, out_shape)
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (*in_shape, rank)) * 0.3
    b = jax.random.normal(kb, (rank, *out_shape)) * 0.3
    return x, kernel, a, b, out_weights


def _unmerged(x, kernel, a, b, scale, n_in):
    return jnp.tensordot(x, kernel, axes=n_in) + scale * jnp.tensordot(jnp.tensordot(x, a, axes=n_in), b, axes=1)


@pytest.mark.parametrize("in_shape,out_shape", [((8,), (4, 6)), ((4, 6), (16,))])
def test_lora_dot_values_and_gradients_equal_autodiff_of_the_unmerged_form(in_shape, out_shape):
    x, kernel, a, b, out_weights = _lora_inputs(in_shape, out_shape)
    n_in, scale = len(in_shape), 2.5
    np.testing.assert_allclose(lora_dense_dot(x, kernel, a, b, scale, n_in, jnp.float32),
                               _unmerged(x, kernel, a, b, scale, n_in), rtol=1e-5, atol=1e-5)
    # Every subset of differentiated inputs (the frozen-base LoRA case is (x, a, b)).
    for argnums in ((0, 1, 2, 3), (0, 2, 3), (2, 3), (2,), (3,), (1,)):
        got = jax.grad(lambda *p: jnp.sum(lora_dense_dot(*p, scale, n_in, jnp.float32) * out_weights), argnums=argnums)(x, kernel, a, b)
        want = jax.grad(lambda *p: jnp.sum(_unmerged(*p, scale, n_in) * out_weights), argnums=argnums)(x, kernel, a, b)
        for g, w in zip(got, want):
            assert g.dtype == jnp.float32 and g.shape == w.shape
            np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_lora_dot_with_zero_b_is_the_base_matmul_bitwise():
    x, kernel, a, b, _ = _lora_inputs((16,), (24,))
    for dtype in (jnp.float32, jnp.bfloat16):
        base = dense_dot(x, kernel, 1, dtype)
        np.testing.assert_array_equal(lora_dense_dot(x, kernel, a, jnp.zeros_like(b), 4.0, 1, dtype), base)


def test_lora_dot_frozen_base_builds_no_full_size_weight_gradient():
    # With the kernel frozen, the only [in, out] products are the merged kernel (forward, and again
    # for dx); autodiff of x . (W + s A B) would add the [in, out] weight gradient x^T g.
    x, kernel, a, b, out_weights = _lora_inputs((16,), (24,))
    loss = lambda a, b, x: jnp.sum(lora_dense_dot(x, kernel, a, b, 2.0, 1, jnp.float32) * out_weights)
    text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(a, b, x).as_text()
    batch_contractions = [line for line in text.splitlines() if "dot_general" in line and "contracting_dims = [0, 1] x [0, 1]" in line]
    # x^T (g B^T) -> [16, r] and (x A)^T g -> [r, 24] contract over the tokens; none yields [16, 24].
    full_size = ("tensor<16x24xf32>", "tensor<24x16xf32>")
    assert batch_contractions
    assert not any(shape in line.split("->")[-1] for line in batch_contractions for shape in full_size)
    # The operand a token contraction transposes (its left one) is the thin [tokens, r] product,
    # never the [tokens, 16] activations: dA is computed as ((g B^T)^T x)^T.
    left_operands = [line.split(": (")[-1].split(",")[0] for line in batch_contractions]
    assert all(operand.endswith("x3xf32>") for operand in left_operands), left_operands


def test_lora_dot_bf16_matches_float32():
    x, kernel, a, b, out_weights = _lora_inputs((16,), (4, 6))
    objective = lambda dtype: (lambda x, a, b: jnp.sum(lora_dense_dot(x, kernel, a, b, 2.0, 1, dtype).astype(jnp.float32) * out_weights))
    got = jax.grad(objective(jnp.bfloat16), argnums=(0, 1, 2))(x, a, b)
    want = jax.grad(objective(jnp.float32), argnums=(0, 1, 2))(x, a, b)
    for g, w in zip(got, want):
        assert g.dtype == jnp.float32  # adapters' gradients in their own dtype, never rounded through bf16
        np.testing.assert_allclose(g, w, atol=0.03 * float(jnp.max(jnp.abs(w))))
