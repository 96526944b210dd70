"""The training objective: weighted next-token cross-entropy with optional z-loss and label smoothing.

Every normalization is written as per-token weights over the *global* batch divided by a
denominator computed from the whole batch. That keeps the loss a plain weighted sum, so
gradients accumulated over micro-batches add up to exactly the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp


def token_weights(batch: Mapping[str, jax.Array], normalization: str) -> tuple[jax.Array, jax.Array]:
    """(per-token weights [B, L], denominator) for the chosen loss normalization.

    "tokens": every weighted token of the global batch counts the same (loss_weights / their sum).
    "sequences": every packed example counts the same: each token's weight is divided by its
    example's weight total, and the denominator is the number of examples with a weighted token.
    The per-token `loss_weights` of the data pipeline are respected in both.
    """
    weights = batch["loss_weights"].astype(jnp.float32)
    if normalization == "tokens":
        total = jnp.sum(weights)
        return weights, jnp.where(total > 0, total, 1.0)
    if normalization != "sequences":
        raise ValueError(f"config.loss.normalization={normalization!r}: expected 'tokens' or 'sequences'")
    rows, length = weights.shape
    segments = batch.get("segment_ids")
    if segments is None:
        segments = jnp.ones_like(weights, dtype=jnp.int32)
    # One id per (row, example); padding (segment 0) keeps its zero weight.
    ids = (jnp.arange(rows, dtype=jnp.int32)[:, None] * length + segments).reshape(-1)
    per_example = jax.ops.segment_sum(weights.reshape(-1), ids, num_segments=rows * length + length)
    example_total = per_example[ids].reshape(rows, length)
    scaled = jnp.where(example_total > 0, weights / jnp.where(example_total > 0, example_total, 1.0), 0.0)
    count = jnp.sum(per_example != 0)
    return scaled, jnp.maximum(count, 1).astype(jnp.float32)


def cross_entropy(
    logits: jax.Array, targets: jax.Array, *, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> jax.Array:
    """Per-token loss [B, L] in float32.

    With label smoothing `eps` the target distribution is `(1 - eps) * one_hot + eps / vocab`.
    The z-loss `z_loss * logsumexp(logits)**2` (PaLM) keeps the softmax normaliser near 1.
    """
    logits = logits.astype(jnp.float32)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target_logit = jnp.take_along_axis(logits, targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    loss = log_z - target_logit
    if label_smoothing:
        uniform = log_z - jnp.mean(logits, axis=-1)
        loss = (1.0 - label_smoothing) * loss + label_smoothing * uniform
    if z_loss:
        loss = loss + z_loss * jnp.square(log_z)
    return loss


def weighted_loss_sum(logits: jax.Array, batch: Mapping[str, jax.Array], weights: jax.Array, loss_config) -> jax.Array:
    """Sum over tokens of loss * weight (divide by the global denominator for the mean)."""
    per_token = cross_entropy(
        logits,
        batch["target_tokens"],
        label_smoothing=float(loss_config.label_smoothing),
        z_loss=float(loss_config.z_loss),
    )
    # where() rather than a product so masked positions cannot turn a finite loss into NaN.
    return jnp.sum(jnp.where(weights != 0, per_token * weights, 0.0))
