"""Loss normalization, per-token weights, label smoothing and z-loss against hand computations."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from flan_jax.train import losses


def _batch(weights, segments):
    weights = np.asarray(weights, np.float32)
    return {"loss_weights": weights, "segment_ids": np.asarray(segments, np.int32), "target_tokens": np.zeros(weights.shape, np.int32)}


def test_token_normalization_is_the_global_weight_sum():
    batch = _batch([[1, 1, 0, 2]], [[1, 1, 1, 2]])
    weights, denom = losses.token_weights(batch, "tokens")
    np.testing.assert_array_equal(weights, batch["loss_weights"])
    assert float(denom) == 4.0


def test_sequence_normalization_weights_each_example_equally():
    # Row 0: example 1 has 2 weighted tokens, example 2 has 1; row 1: example 1 has 4; padding has none.
    batch = _batch([[1, 1, 0, 1, 0], [1, 1, 1, 1, 0]], [[1, 1, 1, 2, 0], [1, 1, 1, 1, 0]])
    weights, denom = losses.token_weights(batch, "sequences")
    np.testing.assert_allclose(weights, [[0.5, 0.5, 0, 1, 0], [0.25, 0.25, 0.25, 0.25, 0]])
    assert float(denom) == 3.0
    with pytest.raises(ValueError, match="normalization"):
        losses.token_weights(batch, "rows")


def test_all_zero_weights_give_zero_loss_not_nan():
    weights, denom = losses.token_weights(_batch([[0, 0]], [[1, 1]]), "tokens")
    assert float(denom) == 1.0


def test_cross_entropy_matches_optax_with_label_smoothing_and_adds_z_loss():
    logits = jax.random.normal(jax.random.key(0), (2, 3, 7)) * 3
    targets = jnp.array([[1, 2, 3], [4, 5, 6]])
    eps = 0.1
    labels = optax.smooth_labels(jax.nn.one_hot(targets, 7), eps)
    expected = optax.softmax_cross_entropy(logits, labels)
    np.testing.assert_allclose(losses.cross_entropy(logits, targets, label_smoothing=eps), expected, rtol=1e-5)
    log_z = jax.nn.logsumexp(logits, -1)
    np.testing.assert_allclose(
        losses.cross_entropy(logits, targets, z_loss=1e-2),
        optax.softmax_cross_entropy_with_integer_labels(logits, targets) + 1e-2 * log_z**2,
        rtol=1e-5,
    )


def test_per_token_weights_are_respected():
    logits = jax.random.normal(jax.random.key(1), (1, 4, 5))
    cfg = ml_collections.ConfigDict({"label_smoothing": 0.0, "z_loss": 0.0})
    batch = {"target_tokens": jnp.array([[0, 1, 2, 3]])}
    per_token = optax.softmax_cross_entropy_with_integer_labels(logits, batch["target_tokens"])[0]
    weights = jnp.array([[0.0, 2.0, 1.0, 0.0]])
    total = losses.weighted_loss_sum(logits, batch, weights, cfg)
    assert float(total) == pytest.approx(float(2 * per_token[1] + per_token[2]), rel=1e-6)
    # A non-finite logit on a zero-weight token must not leak into the loss.
    bad = logits.at[0, 0, :].set(jnp.inf)
    assert np.isfinite(float(losses.weighted_loss_sum(bad, batch, weights, cfg)))
