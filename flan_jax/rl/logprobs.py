"""Per-token log-probabilities (of the sampling distribution), entropies and values of a rollout's rows.

Rollouts sample from softmax(logits / temperature), so the ratio, the KL terms and the entropy
use the same tempered distribution (as trl does); top-k / top-p truncation is not part of it.
Logits are float32 from the model's hidden states and output head; the entropy is computed
under stop_gradient (logged, not trained).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

VALUE_HEAD = "value"


def token_stats(
    model, batch: Mapping[str, jax.Array], temperature: float, *, entropy: bool = False, values: bool = False
) -> dict[str, jax.Array]:
    """{"logps": [rows, L], "entropy"?, "values"?} aligned with batch["target_tokens"]."""
    hidden, head = model.hidden_states(batch["input_tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32) / jnp.float32(temperature)
    log_z = jax.nn.logsumexp(logits, axis=-1)
    target = jnp.take_along_axis(logits, batch["target_tokens"][..., None].astype(jnp.int32), axis=-1)[..., 0]
    out = {"logps": target - log_z}
    if entropy:
        stopped = jax.lax.stop_gradient(logits)
        probs = jax.nn.softmax(stopped, axis=-1)
        out["entropy"] = jax.lax.stop_gradient(log_z) - jnp.sum(probs * stopped, axis=-1)
    if values:
        out["values"] = model.scalar_head(VALUE_HEAD, hidden)
    return out
