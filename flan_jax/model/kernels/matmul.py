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


def _contract_output(g: jax.Array, w: jax.Array, n_in: int) -> jax.Array:
    """g [..., *out] . w [*in, *out] over the output dims (the input gradient), float32 accumulated."""
    n_out = w.ndim - n_in
    dims = ((tuple(range(g.ndim - n_out, g.ndim)), tuple(range(n_in, w.ndim))), ((), ()))
    return jax.lax.dot_general(g, w, dims, preferred_element_type=jnp.float32)


def _contract_leading(a: jax.Array, b: jax.Array, n_lead: int) -> jax.Array:
    """a . b over their first n_lead (batch, length, ...) dims (a weight gradient), float32 accumulated.

    One dot_general over every leading dim lets XLA's CPU backend skip the transposed copy of the
    activations that autodiff of `tensordot` asks for (see the module docstring)."""
    lead = tuple(range(n_lead))
    return jax.lax.dot_general(a, b, ((lead, lead), ((), ())), preferred_element_type=jnp.float32)


def _f32_accumulated_dot_fwd(x, kernel, n_in, kernel_axes):
    y = _contract_last(x, sharding.cast_sharded(kernel, x.dtype, kernel_axes), n_in).astype(x.dtype)
    return y, (x, kernel)


def _f32_accumulated_dot_bwd(n_in, kernel_axes, residuals, g):
    x, kernel = residuals
    w = sharding.cast_sharded(kernel, x.dtype, kernel_axes)
    g = g.astype(x.dtype)
    dx = _contract_output(g, w, n_in)
    dw = _contract_leading(x, g, x.ndim - n_in)
    return dx.astype(x.dtype), dw.astype(kernel.dtype)


_f32_accumulated_dot.defvjp(_f32_accumulated_dot_fwd, _f32_accumulated_dot_bwd)


def lora_dense_dot(
    x: jax.Array, kernel: jax.Array, lora_a: jax.Array, lora_b: jax.Array, scale: float, n_in: int,
    dtype: jnp.dtype, kernel_axes: tuple[str, ...] | None = None,
) -> jax.Array:
    """`x . W + scale * (x . A) . B` as one matmul over the merged kernel `W + scale * A . B`.

    Shapes: x [..., *in], W [*in, *out], A [*in, r], B [r, *out]; result [..., *out] in `dtype`.

    Why merge on the fly: besides the base matmul, the unmerged form runs six thin rank-r matmuls
    per projection (x A and then B forward; dB, g B^T, dA and (g B^T) A^T backward) and two
    full-size adds, each a memory-bound pass over the activations. Merged, the forward is one
    matmul and dx one more; the adapters' gradients take four rank-r products (see the backward),
    never the full-size weight gradient that autodiff of `x . (W + s A B)` would build. The merge
    costs in*out*r multiply-adds and one kernel-sized write, which pays when a step has many more
    tokens than the kernel has input or output features: the 7M benchmark's LoRA step (4096 tokens)
    got 7-11% faster, SmolLM2's shape at 1024 tokens did not change measurably (benchmarks/RESULTS.md).
    With B = 0 the merged kernel is W exactly, so step 0 still equals the base model bitwise.

    Every matmul takes `dtype` operands and accumulates in float32, as `dense_dot`'s "cpu" path, for
    every kernel choice (GPUs and TPUs run bf16 matmuls that way natively); the merge itself is
    float32. Only the gradients of differentiated inputs are built: a frozen base kernel, as in
    LoRA, gets none, and neither does the input of a layer below every trained parameter.
    """
    return _lora_dot(x.astype(dtype), kernel, lora_a, lora_b, float(scale), int(n_in), kernel_axes)


def _merged_kernel(kernel, lora_a, lora_b, scale, dtype, kernel_axes):
    delta = jnp.tensordot(lora_a.astype(jnp.float32), lora_b.astype(jnp.float32), axes=1)
    merged = kernel.astype(jnp.float32) + jnp.asarray(scale, jnp.float32) * delta
    return sharding.cast_sharded(merged, dtype, kernel_axes)


@partial(jax.custom_vjp, nondiff_argnums=(4, 5, 6))
def _lora_dot(x, kernel, lora_a, lora_b, scale, n_in, kernel_axes):
    return _lora_forward(x, kernel, lora_a, lora_b, scale, n_in, kernel_axes)


def _lora_forward(x, kernel, lora_a, lora_b, scale, n_in, kernel_axes):
    return _contract_last(x, _merged_kernel(kernel, lora_a, lora_b, scale, x.dtype, kernel_axes), n_in).astype(x.dtype)


def _lora_dot_fwd(x, kernel, lora_a, lora_b, scale, n_in, kernel_axes):
    # symbolic_zeros: the primals arrive as CustomVJPPrimal(value, perturbed); which gradients are
    # wanted is static and travels to the backward in the residuals' structure.
    values = (x.value, kernel.value, lora_a.value, lora_b.value)
    y = _lora_forward(*values, scale, n_in, kernel_axes)
    primals = zip(("x", "kernel", "lora_a", "lora_b"), (x, kernel, lora_a, lora_b))
    wanted = {name: () for name, primal in primals if primal.perturbed}
    return y, (values, wanted)


def _lora_dot_bwd(scale, n_in, kernel_axes, saved, g):
    (x, kernel, lora_a, lora_b), wanted = saved
    if isinstance(g, jax.custom_derivatives.SymbolicZero) or not wanted:
        return None, None, None, None
    g = g.astype(x.dtype)
    n_lead = x.ndim - n_in
    s = jnp.asarray(scale, jnp.float32)
    dx = dkernel = da = db = None
    if "x" in wanted:
        dx = _contract_output(g, _merged_kernel(kernel, lora_a, lora_b, scale, x.dtype, kernel_axes), n_in).astype(x.dtype)
    if "kernel" in wanted:  # the base trained too (unusual with LoRA, but allowed by the filter)
        dkernel = _contract_leading(x, g, n_lead).astype(kernel.dtype)
    if "lora_a" in wanted:
        # dA = s * x^T (g B^T): the rank-r product first, then one contraction over the tokens,
        # written as ((g B^T)^T x)^T. A matmul that contracts its left operand's leading dims
        # transposes that operand first (XLA's CPU dot does, as a copy); this way round it is the
        # [tokens, r] product, not the [tokens, in] activations (7M benchmark: 16 activation-sized
        # copies per step less, benchmarks/RESULTS.md).
        gb = _contract_output(g, lora_b.astype(x.dtype), 1).astype(x.dtype)
        da = jnp.moveaxis(s * _contract_leading(gb, x, n_lead), 0, -1).astype(lora_a.dtype)
    if "lora_b" in wanted:
        # dB = s * (x A)^T g.
        xa = _contract_last(x, lora_a.astype(x.dtype), n_in).astype(x.dtype)
        db = (s * _contract_leading(xa, g, n_lead)).astype(lora_b.dtype)
    return dx, dkernel, da, db


_lora_dot.defvjp(_lora_dot_fwd, _lora_dot_bwd, symbolic_zeros=True)
