"""Tiny stand-ins shared by the trainer tests: an NNX LM with logical axes and packed batches.

They follow the model and batch contracts of docs/design.md (§4, §5) so the trainer pieces can
be tested without the real model, data pipeline or tokenizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flan_jax import default_config, sharding


class TinyLM(nnx.Module):
    """Embedding -> RMS norm -> MLP (residual) -> untied output head."""

    def __init__(self, vocab: int = 32, d_model: int = 16, d_ff: int = 32, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.2)
        self.embed = nnx.Param(init(rngs.params(), (vocab, d_model)), logical_axes=("vocab", "embed"))
        self.norm_scale = nnx.Param(jnp.ones((d_model,)), logical_axes=("embed",))
        self.w_in = nnx.Param(init(rngs.params(), (d_model, d_ff)), logical_axes=("embed", "mlp"))
        self.w_out = nnx.Param(init(rngs.params(), (d_ff, d_model)), logical_axes=("mlp", "embed"))
        self.head = nnx.Param(init(rngs.params(), (d_model, vocab)), logical_axes=("embed", "vocab"))

    def __call__(self, input_tokens, *, positions=None, segment_ids=None, prefix_mask=None):
        x = jnp.take(self.embed[...], input_tokens, axis=0)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * self.norm_scale[...]
        h = jax.nn.gelu(h @ self.w_in[...])
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        x = x + h @ self.w_out[...]
        return (x @ self.head[...]).astype(jnp.float32)


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.data.seq_len = 8
    config.data.batch_size = 8
    config.model.vocab_size = 32
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-2
    config.train.num_steps = 10
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def packed_batch(seed: int, rows: int = 8, length: int = 8, vocab: int = 32) -> dict[str, np.ndarray]:
    """A batch of the §4 packed format with 1-3 examples per row and some padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(rows, length + 1)).astype(np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for r in range(rows):
        used = rng.integers(length // 2, length + 1)
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(2, used - 1), replace=False))
        bounds = [0, *[c for c in cuts if rng.random() < 0.6], used]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            segment_ids[r, a:b] = s + 1
            positions[r, a:b] = np.arange(b - a)
    loss_weights = ((segment_ids > 0) & (rng.random((rows, length)) < 0.7)).astype(np.float32)
    return {
        "input_tokens": tokens[:, :-1] * (segment_ids > 0),
        "target_tokens": tokens[:, 1:] * (segment_ids > 0),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_weights": loss_weights,
        "prefix_mask": np.zeros((rows, length), np.int32),
    }
