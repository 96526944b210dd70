"""Rotary embeddings (rotate-half, the layout of HF Llama checkpoints): tables and application.

`tables` and `apply` take the kernel choice of `flan_jax.model.kernels` ("cpu" or "xla"):

* tables, "cpu": cos and sin are the two iterations of a `lax.map`. A loop body is a fusion
  boundary, so XLA writes each table once into a buffer. Left to XLA's CPU fusion, the float32
  cos/sin were re-evaluated inside every consumer: per head, for q and k, forward and backward, in
  every layer (~10% of a float32 7M-parameter training step; docs/training.md, "CPU performance").
  `lax.optimization_barrier` does not prevent that: XLA strips it before fusing. The loop runs
  over a new leading axis, so the batch dimension keeps its sharding. "xla": plain `cos`, `sin`.
* apply, "cpu": RoPE is a rotation, so its gradient is the inverse rotation (RoPE with -sin; both
  halves of the tables carry the same angles). Written out because autodiff of the rotate-half
  concatenation pads and adds each half separately, with a bf16 rounding after every step, which
  XLA's CPU backend runs as separate passes. "xla": autodiff of `rotate`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def tables(freqs: jax.Array, impl: str) -> tuple[jax.Array, jax.Array]:
    """cos, sin tables [..., 2 * pairs] of the angles `freqs` [..., pairs] (both halves the same)."""
    if impl == "cpu":
        cos, sin = jax.lax.map(lambda i: jax.lax.switch(i, (jnp.cos, jnp.sin), freqs), jnp.arange(2))
    else:
        cos, sin = jnp.cos(freqs), jnp.sin(freqs)
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


def rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """RoPE on x [B, L, heads, head_dim] with tables [B, L, head_dim]."""
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def apply(x: jax.Array, cos: jax.Array, sin: jax.Array, impl: str) -> jax.Array:
    """`rotate`, with the hand-written backward pass for impl="cpu" (see the module docstring)."""
    return rotate_inverse_vjp(x, cos, sin) if impl == "cpu" else rotate(x, cos, sin)


@jax.custom_vjp
def rotate_inverse_vjp(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """`rotate` whose gradient is the inverse rotation; cos and sin (from integer positions) get none."""
    return rotate(x, cos, sin)


def _fwd(x, cos, sin):
    return rotate(x, cos, sin), (cos, sin)


def _bwd(residuals, d_out):
    cos, sin = residuals
    return rotate(d_out, cos, -sin), None, None


rotate_inverse_vjp.defvjp(_fwd, _bwd)
