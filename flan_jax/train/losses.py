"""The training objective: weighted next-token cross-entropy with optional z-loss and label smoothing.

Every normalization is written as per-token weights over the *global* batch divided by a
denominator computed from the whole batch. That keeps the loss a plain weighted sum, so
gradients accumulated over micro-batches add up to exactly the full-batch gradient.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from flan_jax import sharding


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


@partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def head_cross_entropy(
    hidden: jax.Array, head: jax.Array, targets: jax.Array, label_smoothing: float = 0.0, z_loss: float = 0.0
) -> jax.Array:
    """`cross_entropy(hidden @ head, targets)` [B, L] with a hand-written backward pass.

    hidden [B, L, D] and head [D, V] in the compute dtype; logits are float32. Same values as the
    two-step version, but the gradient is written as the softmax tensor fed to plain matmuls (see
    the backward). XLA's autodiff of take_along_axis + dot instead scatters into a zero [B*L, V]
    tensor and transposes it; on the 7m CPU benchmark (vocab 8000) the hand-written version makes
    the head + loss forward/backward 1.5x faster (docs/training.md, "CPU performance").
    The backward depends on which inputs are differentiated (`symbolic_zeros`: the forward sees
    whether the head is trained or frozen, as in LoRA), so each case builds only what it needs.
    """
    return _forward(hidden, head, targets, label_smoothing, z_loss)[0]


def _forward(hidden, head, targets, label_smoothing, z_loss):
    logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
    loss = cross_entropy(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    return loss, (hidden, head, targets, logits, log_z)


def _head_cross_entropy_fwd(hidden, head, targets, label_smoothing, z_loss):
    # With symbolic_zeros the primals arrive as CustomVJPPrimal(value, perturbed). Which gradients
    # are wanted is static, so it travels in the residuals' structure (a key present or absent).
    loss, residuals = _forward(hidden.value, head.value, targets.value, label_smoothing, z_loss)
    wanted = {name: () for name, primal in (("hidden", hidden), ("head", head)) if primal.perturbed}
    return loss, (residuals, wanted)


def _head_cross_entropy_bwd(label_smoothing, z_loss, saved, g):
    (hidden, head, targets, logits, log_z), wanted = saved
    if isinstance(g, SymbolicZero) or not wanted:
        return None, None, None
    vocab = logits.shape[-1]
    targets = targets.astype(jnp.int32)
    # d loss / d logits = softmax * (1 + 2 z log_z) - (1 - eps) * one_hot - eps / vocab, times g.
    probs = jnp.exp(logits - log_z[..., None])
    if z_loss:
        probs = probs * (1.0 + 2.0 * z_loss * log_z)[..., None]
    if "head" in wanted:
        # A trained head: one [B, L, V] tensor with the target terms fused in feeds both matmuls.
        # (Not a scatter-add of the target terms into d_head: that makes GSPMD replicate the
        # token-sharded rows on a pod mesh; tests/test_pod_sharding.py catches it.)
        is_target = jnp.arange(vocab, dtype=jnp.int32) == targets[..., None]
        d_logits = probs - jnp.where(is_target, 1.0 - label_smoothing, 0.0)
        if label_smoothing:
            d_logits = d_logits - label_smoothing / vocab
        d_logits = (d_logits * g[..., None]).astype(hidden.dtype)
        d_head = jnp.einsum("bld,blv->dv", hidden, d_logits, preferred_element_type=jnp.float32)
        d_hidden = None
        if "hidden" in wanted:
            d_hidden = jnp.einsum("blv,dv->bld", d_logits, head, preferred_element_type=jnp.float32)
            d_hidden = d_hidden.astype(hidden.dtype)
        return d_hidden, d_head.astype(head.dtype), None
    # A frozen head (LoRA): d_hidden alone. The softmax part goes through the matmul and the target
    # part is a gather of the head's target columns, so no [B, L, V] one-hot is built: XLA:CPU
    # materialises that one-hot as a separate tensor when it fuses the softmax into this matmul,
    # and writing it cost as much as the matmul.
    d_softmax = (probs * g[..., None]).astype(hidden.dtype)
    on_target = (1.0 - label_smoothing) * g  # [B, L] float32: subtracted at each token's target logit
    # [B, L, D]: head[:, target], looked up like the embedding (model/transformer.py `gathered_table`):
    # with the table's embed dimension gathered first, GSPMD does a masked local lookup over the
    # vocab shards instead of gathering the (batch-sharded) token ids.
    table = sharding.constrain(head.T, ("vocab", None))
    target_columns = jnp.take(table, targets, axis=0).astype(jnp.float32)
    d_hidden = jnp.einsum("blv,dv->bld", d_softmax, head, preferred_element_type=jnp.float32)
    d_hidden = d_hidden - on_target[..., None] * target_columns
    if label_smoothing:
        uniform = label_smoothing / vocab * g  # [B, L]: subtracted from every logit's gradient
        d_hidden = d_hidden - uniform[..., None] * jnp.sum(head.astype(jnp.float32), axis=1)
    return d_hidden.astype(hidden.dtype), None, None


head_cross_entropy.defvjp(_head_cross_entropy_fwd, _head_cross_entropy_bwd, symbolic_zeros=True)


def weighted_head_loss_sum(
    hidden: jax.Array, head: jax.Array, batch: Mapping[str, jax.Array], weights: jax.Array, loss_config
) -> jax.Array:
    """`weighted_loss_sum` of the logits `hidden @ head`, through `head_cross_entropy`."""
    per_token = head_cross_entropy(
        hidden, head, batch["target_tokens"], float(loss_config.label_smoothing), float(loss_config.z_loss)
    )
    return jnp.sum(jnp.where(weights != 0, per_token * weights, 0.0))


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
