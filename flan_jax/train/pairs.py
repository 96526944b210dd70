"""Per-response reductions of a packed pairs batch (flan_jax.data.converters.pairs), inside jit.

A pairs row holds up to `max_pairs(seq_len)` pairs; position t belongs to pair `pair_ids[t]` and to
its chosen (response_role 1) or rejected (2) response when its target token is a response token.
Everything per pair is laid out as `[rows, max_pairs]` arrays (pair k of a row at column k - 1),
with `valid` marking the columns that hold a pair, so objectives can sum over pairs with a mask
and never split a row.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from flan_jax.data.converters.pairs import CHOSEN, REJECTED


def max_pairs(seq_len: int) -> int:
    """An upper bound on the pairs of one row: each half has at least 2 features (BOS + 1 response token)."""
    return max(seq_len // 4, 1)


class PerResponse(NamedTuple):
    """Sums over the tokens of each response: chosen / rejected `[rows, max_pairs]`, float32."""

    chosen: jax.Array
    rejected: jax.Array


def response_sums(values: jax.Array, batch: Mapping[str, jax.Array]) -> PerResponse:
    """Sum of per-position `values` [rows, L] over each response's target tokens (prompt and padding left out)."""
    rows, length = values.shape
    pairs = max_pairs(length)
    role = batch["response_role"].astype(jnp.int32)
    pair = batch["pair_ids"].astype(jnp.int32)
    # Column (pair - 1) * 2 + (role - 1) of each row; everything else goes to a discarded last column.
    slot = jnp.where((role > 0) & (pair > 0), (pair - 1) * 2 + role - 1, 2 * pairs)
    ids = (jnp.arange(rows, dtype=jnp.int32)[:, None] * (2 * pairs + 1) + slot).reshape(-1)
    sums = jax.ops.segment_sum(
        jnp.where(role > 0, values, 0.0).astype(jnp.float32).reshape(-1), ids, num_segments=rows * (2 * pairs + 1)
    ).reshape(rows, 2 * pairs + 1)[:, : 2 * pairs].reshape(rows, pairs, 2)
    return PerResponse(sums[..., CHOSEN - 1], sums[..., REJECTED - 1])


def response_lengths(batch: Mapping[str, jax.Array]) -> PerResponse:
    """Number of target tokens of each response (its EOS included)."""
    return response_sums(jnp.ones(batch["response_role"].shape, jnp.float32), batch)


def valid_pairs(batch: Mapping[str, jax.Array]) -> jax.Array:
    """[rows, max_pairs] bool: the columns that hold a pair (both responses present)."""
    lengths = response_lengths(batch)
    return (lengths.chosen > 0) & (lengths.rejected > 0)


def last_response_positions(batch: Mapping[str, jax.Array]) -> jax.Array:
    """[rows, L] bool: the last position of each response, whose input is the response's last token.

    A reward model reads its score there (like transformers' *ForSequenceClassification, which reads
    the last non-padding token of `[BOS] prompt response`).
    """
    role = batch["response_role"]
    segments = batch["segment_ids"]
    next_segment = jnp.concatenate([segments[:, 1:], jnp.zeros_like(segments[:, :1])], axis=1)
    return (role > 0) & (next_segment != segments)


def token_log_probs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log p(target) per position [rows, L], float32."""
    logits = logits.astype(jnp.float32)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return target_logit - jax.nn.logsumexp(logits, axis=-1)


def response_log_probs(logits: jax.Array, batch: Mapping[str, jax.Array]) -> PerResponse:
    """Each response's log-probability (sum over its tokens, EOS included) under `logits` [rows, L, vocab]."""
    return response_sums(token_log_probs(logits, batch["target_tokens"]), batch)
