"""The fused head + cross-entropy loss equals the plain logits path in value and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from flan_jax.train import losses


@pytest.mark.parametrize("label_smoothing,z_loss", [(0.0, 0.0), (0.1, 0.0), (0.0, 1e-2), (0.2, 1e-3)])
@pytest.mark.parametrize("argnums", [(0, 1), (0,), (1,)], ids=["both", "frozen_head", "head_only"])
def test_head_cross_entropy_matches_autodiff_of_the_logits_path(label_smoothing, z_loss, argnums):
    """Each differentiated subset takes its own backward branch (a frozen head builds no one-hot)."""
    k1, k2, k3, k4 = jax.random.split(jax.random.key(0), 4)
    hidden = jax.random.normal(k1, (2, 5, 8))
    head = jax.random.normal(k2, (8, 11))
    targets = jax.random.randint(k3, (2, 5), 0, 11)
    weights = jax.random.uniform(k4, (2, 5)).at[0, 1].set(0.0)

    def fused(hidden, head):
        per_token = losses.head_cross_entropy(hidden, head, targets, label_smoothing, z_loss)
        return jnp.sum(per_token * weights)

    def plain(hidden, head):
        logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
        per_token = losses.cross_entropy(logits, targets, label_smoothing=label_smoothing, z_loss=z_loss)
        return jnp.sum(per_token * weights)

    value, grads = jax.jit(jax.value_and_grad(fused, argnums=argnums))(hidden, head)
    expected_value, expected_grads = jax.value_and_grad(plain, argnums=argnums)(hidden, head)
    np.testing.assert_allclose(value, expected_value, rtol=1e-6)
    for got, expected in zip(grads, expected_grads):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_head_cross_entropy_keeps_the_compute_dtype_of_its_inputs():
    hidden = jnp.ones((1, 3, 4), jnp.bfloat16)
    head = jnp.ones((4, 6), jnp.bfloat16)
    grads = jax.grad(lambda h, w: jnp.sum(losses.head_cross_entropy(h, w, jnp.zeros((1, 3), jnp.int32))), argnums=(0, 1))(
        hidden, head
    )
    assert [g.dtype for g in grads] == [jnp.bfloat16, jnp.bfloat16]


def test_a_frozen_head_backward_builds_no_vocab_sized_one_hot():
    """With the head frozen the target terms are a gather, not a [B, L, V] comparison with iota."""
    hidden = jnp.ones((2, 5, 8))
    head = jnp.ones((8, 11))
    targets = jnp.zeros((2, 5), jnp.int32)

    def loss(hidden, head):
        return jnp.sum(losses.head_cross_entropy(hidden, head, targets))

    def one_hot_compares(argnums):
        jaxpr = str(jax.make_jaxpr(jax.grad(loss, argnums=argnums))(hidden, head))
        return jaxpr.count("bool[2,5,11]")

    assert one_hot_compares((0,)) == 0
    assert one_hot_compares((0, 1)) > 0
