"""Weight matmuls: `tensordot` in the compute dtype ("xla"), or with float32 accumulation in every
pass, forward and backward ("cpu"; see flan_jax.model.kernels).

Why a custom VJP for "cpu": with bfloat16 operands, XLA's CPU backend (YNNPACK) and GPUs run a matmul that
accumulates into float32 (`preferred_element_type=float32`) on the bf16 dot-product units, about
2x a float32 matmul on this project's CPU (benchmarks/RESULTS.md); a matmul whose *output* is
bf16, or whose operands mix f32 and bf16, falls back to the slow path. Autodiff of
`dot(x, w, preferred_element_type=f32).astype(bf16)` gives exactly such mixed matmuls (the
cotangent is f32), so the backward pass is written here: both gradient matmuls take bf16
operands and accumulate in f32, and the weight gradient is returned in the parameter's dtype
without a round trip through bf16.

float32 takes the same path for its backward pass: the weight gradient written as one
`dot_general` that contracts over every leading (batch, length) dim lets XLA's CPU backend skip
the transposed copy of the activations that autodiff of `tensordot` asks for; the 7M benchmark's
float32 step got 8-10% faster (docs/training.md, "CPU performance").
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp

from flan_jax import sharding


def dense_dot(
    x: jax.Array, kernel: jax.Array, n_in: int, dtype: jnp.dtype, impl: str = "cpu",
    kernel_axes: tuple[str, ...] | None = None,
) -> jax.Array:
    """`tensordot(x, kernel, n_in)` computed in `dtype`, result in `dtype`.

    impl="cpu": float32 accumulation in the forward and both backward matmuls; `kernel` stays in
    its parameter dtype until inside, so its gradient is accumulated and returned in that dtype.
    impl="xla": `tensordot` of the operands cast to `dtype`, differentiated by autodiff (GPUs and
    TPUs accumulate bf16 matmuls in float32 in hardware). Either way `kernel_axes` (the kernel's
    logical axis names) pin the cast copy to the kernel's own sharding, so an FSDP all-gather
    moves the compute dtype, not the float32 master weights (`sharding.cast_sharded`).
    """
    dtype = jnp.dtype(dtype)
    if impl == "xla":
        return jnp.tensordot(x.astype(dtype), sharding.cast_sharded(kernel, dtype, kernel_axes), axes=n_in)
    return _f32_accumulated_dot(x.astype(dtype), kernel, n_in, kernel_axes)


@partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _f32_accumulated_dot(x: jax.Array, kernel: jax.Array, n_in: int, kernel_axes) -> jax.Array:
    return _f32_accumulated_dot_fwd(x, kernel, n_in, kernel_axes)[0]


def _contract_last(a: jax.Array, b: jax.Array, n: int) -> jax.Array:
    """a . b over a's last n dims and b's first n dims, accumulated in float32."""
    dims = ((tuple(range(a.ndim - n, a.ndim)), tuple(range(n))), ((), ()))
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def _f32_accumulated_dot_fwd(x, kernel, n_in, kernel_axes):
    y = _contract_last(x, sharding.cast_sharded(kernel, x.dtype, kernel_axes), n_in).astype(x.dtype)
    return y, (x, kernel)


def _f32_accumulated_dot_bwd(n_in, kernel_axes, residuals, g):
    x, kernel = residuals
    w = sharding.cast_sharded(kernel, x.dtype, kernel_axes)
    n_out = w.ndim - n_in
    g = g.astype(x.dtype)
    # dx: contract g's output dims with the kernel's output dims.
    out_dims = tuple(range(g.ndim - n_out, g.ndim))
    dx = jax.lax.dot_general(g, w, ((out_dims, tuple(range(n_in, w.ndim))), ((), ())), preferred_element_type=jnp.float32)
    # dkernel: contract over every leading (batch, length, ...) dim of x and g.
    lead = tuple(range(x.ndim - n_in))
    dw = jax.lax.dot_general(x, g, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_f32_accumulated_dot.defvjp(_f32_accumulated_dot_fwd, _f32_accumulated_dot_bwd)
