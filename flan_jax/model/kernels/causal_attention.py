"""Causal softmax attention that skips the masked upper-triangle blocks; the CPU training path.

Query block [i0, i1) can only see keys [0, i1) when no query sees a later key, so each block of
`CAUSAL_BLOCK` queries attends to that key prefix only and the fully masked blocks above the
diagonal are never computed: with 4 blocks about 10/16 of the score matmuls, softmax and their
gradients. Results equal masked softmax attention (`transformer.reference_attention`) up to float
rounding; tests/test_causal_block_attention.py checks values and gradients.

Why one custom VJP around the whole block loop (rather than autodiff of per-block pieces):
  * every matmul, forward and backward, takes operands in the compute dtype and accumulates in
    float32; autodiff would feed float32 cotangents to bf16 operands, XLA's slow mixed-dtype
    matmul path on CPU (see matmul.py);
  * the query gradient is a concatenation of per-block results, and the key/value gradients are
    summed over blocks in float32 and rounded once. Autodiff of slices pads every block's
    gradient to full length and adds them in the compute dtype; those pads were the largest
    elementwise item of the bf16 training step's profile (docs/training.md, "CPU performance").
"""

from __future__ import annotations

import math
from functools import partial

import jax
import jax.numpy as jnp

# Queries per block: small enough to skip most of the masked upper triangle, large enough that
# each block's matmuls stay efficient (64 and 256 measured slower on the 7M benchmark's shapes).
CAUSAL_BLOCK = 128

Blocks = tuple[tuple[int, int], ...]  # (first query, end of queries = end of visible keys) per block


def causal_block_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, block: int | None = None) -> jax.Array:
    """Masked softmax attention for a `mask` that never lets query i see a key j > i.

    q [B, T, H, D], k/v [B, S, KV, D] (grouped-query heads when KV < H), mask [B, 1, T, S] ->
    [B, T, H, D] in v's dtype. q, k and v are put head-major once, so each block is a contiguous
    slice and no matmul inside the loop needs a transposed copy. Lengths that do not split into
    whole blocks (or S != T) run as a single block.
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    block = block or CAUSAL_BLOCK
    if t <= block or t % block or k.shape[1] != t:
        blocks: Blocks = ((0, t),)
    else:
        blocks = tuple((end - block, end) for end in range(block, t + 1, block))
    q = q.reshape(b, t, kv, h // kv, d).transpose(0, 2, 3, 1, 4)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, KV, S, D]
    out = _blocked_attention(q, k, v, mask, blocks)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


@partial(jax.custom_vjp, nondiff_argnums=(4,))
def _blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, blocks: Blocks) -> jax.Array:
    """Head-major core: q [B, KV, G, T, D], k and v [B, KV, S, D] -> [B, KV, G, T, D].

    The 1/sqrt(D) scale is applied to the float32 scores (and their gradient), where it fuses
    into the softmax, rather than to q in the compute dtype. The softmax division comes after the
    value matmul: dividing the [.., T, D] output by the row sums instead of the [.., T, S]
    probabilities saves a pass over the scores forward and backward. Every row sees at least its
    own key (attention_mask), so the row sums are >= 1.
    """
    return _blocked_attention_fwd(q, k, v, mask, blocks)[0]


def _scale(q: jax.Array) -> float:
    return 1.0 / math.sqrt(q.shape[-1])


def _key_end(blocks: Blocks, end: int, n_keys: int) -> int:
    return n_keys if len(blocks) == 1 else end


def _blocked_attention_fwd(q, k, v, mask, blocks):
    outs, unnormalized, row_sums = [], [], []
    for start, end in blocks:
        keys = _key_end(blocks, end, k.shape[2])
        scores = jnp.einsum("bkgtd,bksd->bkgts", q[:, :, :, start:end], k[:, :, :keys], preferred_element_type=jnp.float32)
        scores = jnp.where(mask[:, :, None, start:end, :keys], scores * _scale(q), jnp.finfo(jnp.float32).min)
        # Kept in the compute dtype: the value matmuls use it so, and it halves the saved bytes in bf16.
        probs = jnp.exp(scores - jnp.max(scores, axis=-1, keepdims=True)).astype(v.dtype)
        sums = jnp.sum(probs, axis=-1, keepdims=True, dtype=jnp.float32)  # [B, KV, G, block, 1]
        out = jnp.einsum("bkgts,bksd->bkgtd", probs, v[:, :, :keys], preferred_element_type=jnp.float32)
        outs.append((out / sums).astype(v.dtype))
        unnormalized.append(probs)
        row_sums.append(sums)
    out = jnp.concatenate(outs, axis=3) if len(outs) > 1 else outs[0]
    return out, (q, k, v, tuple(unnormalized), tuple(row_sums), out)


def _blocked_attention_bwd(blocks, residuals, d_out):
    """The standard softmax-attention gradient, block by block (see the module docstring)."""
    q, k, v, unnormalized, row_sums, out = residuals
    dtype = v.dtype
    d_q_blocks = []
    d_k = jnp.zeros(k.shape, jnp.float32)
    d_v = jnp.zeros(v.shape, jnp.float32)
    for (start, end), probs, sums in zip(blocks, unnormalized, row_sums):
        keys = _key_end(blocks, end, k.shape[2])
        d_block = d_out[:, :, :, start:end]
        d_block32 = d_block.astype(jnp.float32)
        # probs / sums is the softmax; the division is folded into the smaller operand each time.
        d_v_block = jnp.einsum(
            "bkgts,bkgtd->bksd", probs, (d_block32 / sums).astype(dtype), preferred_element_type=jnp.float32
        )
        d_probs = jnp.einsum("bkgtd,bksd->bkgts", d_block.astype(dtype), v[:, :, :keys], preferred_element_type=jnp.float32)
        # d scores = p * (d_probs - sum_s(p * d_probs)), and sum_s(p * d_probs) = d_out . out.
        row_dot = jnp.sum(d_block32 * out[:, :, :, start:end].astype(jnp.float32), axis=-1, keepdims=True)
        d_scores = (probs.astype(jnp.float32) / sums * (d_probs - row_dot) * _scale(q)).astype(dtype)
        d_q_blocks.append(
            jnp.einsum("bkgts,bksd->bkgtd", d_scores, k[:, :, :keys], preferred_element_type=jnp.float32).astype(q.dtype)
        )
        d_k_block = jnp.einsum("bkgts,bkgtd->bksd", d_scores, q[:, :, :, start:end], preferred_element_type=jnp.float32)
        d_k = d_k.at[:, :, :keys].add(d_k_block)
        d_v = d_v.at[:, :, :keys].add(d_v_block)
    d_q = jnp.concatenate(d_q_blocks, axis=3) if len(d_q_blocks) > 1 else d_q_blocks[0]
    return d_q, d_k.astype(k.dtype), d_v.astype(dtype), None


_blocked_attention.defvjp(_blocked_attention_fwd, _blocked_attention_bwd)
