"""The decoder-only transformer: config-driven, packed-sequence aware, in Flax NNX.

Read top to bottom: parameters with logical axes, norms, rotary embeddings, the attention mask,
attention, MLP, block, model. Llama 2/3, Mistral, Qwen2, Gemma and GPT-2 are all this one model
with different `ModelConfig` switches (see config.py).

Why NNX: parameters are plain `nnx.Param`s with a `logical_axes` metadata tuple, so the trainer can
`nnx.split` / `nnx.merge`, save `nnx.state(model, nnx.Param)` with Orbax and map the names to mesh
axes itself. Nothing here names a mesh axis, so the model can be built with no mesh at all
(tests, generation, conversion); activations are hinted with `sharding.constrain`, a no-op outside
`sharding.use_rules`.

Packing: `segment_ids` (1, 2, ... per example, 0 = padding) restrict attention to the token's own
segment, causally; `positions` come from the input and restart per segment; `prefix_mask` marks
prefix-LM tokens that also see each other bidirectionally. Padding tokens attend to earlier
padding only (always at least to themselves), so they never produce NaNs.

KV cache (used by generate.py): `forward(..., cache=, cache_index=)` writes this call's keys and
values into the cache at `cache_index` and attends over the whole cache with the given mask.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flan_jax import sharding
from flan_jax.model.causal_attention import causal_block_attention
from flan_jax.model.config import ModelConfig
from flan_jax.model.matmul import dense_dot

# One layer's cache: (keys, values), each [batch, cache_len, n_kv_heads, head_dim].
LayerCache = tuple[jax.Array, jax.Array]


def _param(rngs: nnx.Rngs, init: Any, shape: tuple[int, ...], axes: tuple[str, ...], cfg: ModelConfig) -> nnx.Param:
    """A parameter with its logical axis names (see flan_jax.sharding.DEFAULT_RULES)."""
    assert len(shape) == len(axes), (shape, axes)
    return nnx.Param(init(rngs.params(), shape, jnp.dtype(cfg.param_dtype)), logical_axes=axes)


class Dense(nnx.Module):
    """y = x . W (+ b), contracting x's last `len(in_shape)` dims; W has shape in_shape + out_shape.

    Multi-dimensional in/out shapes keep the head structure visible in the parameters
    (e.g. q: [embed, heads, head_dim]) so each dimension gets its own logical axis name.
    """

    def __init__(
        self, in_shape, out_shape, axes, *, use_bias: bool, cfg: ModelConfig, rngs: nnx.Rngs, std: float | None = None
    ):
        self.n_in = len(in_shape)
        self.dtype = jnp.dtype(cfg.dtype)
        init = nnx.initializers.normal(cfg.init_std if std is None else std)  # T5 sets a std per projection
        self.kernel = _param(rngs, init, (*in_shape, *out_shape), axes, cfg)
        if use_bias:
            bias_axes = axes[self.n_in:]
            self.bias = _param(rngs, nnx.initializers.zeros, tuple(out_shape), bias_axes, cfg)
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense_dot(x, self.kernel[...], self.n_in, self.dtype)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (Llama; Gemma's variant scales by 1 + w) or LayerNorm with bias (GPT-2).

    Statistics are computed in float32 like the reference implementations, and so are the scale
    and bias: the result is rounded to the compute dtype once. (HF Llama rounds to bf16 before
    scaling; besides a second rounding, that makes the scale's gradient a bf16 reduction over
    every token, ~10x less accurate than this float32 one.)
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        scale_init = nnx.initializers.zeros if cfg.norm_scale_plus_one else nnx.initializers.ones
        self.scale = _param(rngs, scale_init, (cfg.d_model,), ("embed",), cfg)
        self.bias = _param(rngs, nnx.initializers.zeros, (cfg.d_model,), ("embed",), cfg) if cfg.norm_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x32 = x.astype(jnp.float32)
        if cfg.norm == "layer":
            x32 = x32 - jnp.mean(x32, axis=-1, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + cfg.norm_eps)
        scale = self.scale[...].astype(jnp.float32)
        y = y * (1.0 + scale if cfg.norm_scale_plus_one else scale)  # Gemma scales by 1 + w
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


# ---------------------------------------------------------------------- rotary embeddings
def rope_inverse_frequencies(cfg: ModelConfig) -> np.ndarray:
    """Per-pair rotation frequencies, with Llama 3 / linear context scaling (as in HF)."""
    inv_freq = 1.0 / (cfg.rope_theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    if cfg.rope_scaling == "linear":
        inv_freq = inv_freq / cfg.rope_factor
    elif cfg.rope_scaling == "llama3":
        old_len = cfg.rope_original_max_positions
        low_wavelen = old_len / cfg.rope_low_freq_factor
        high_wavelen = old_len / cfg.rope_high_freq_factor
        wavelen = 2 * math.pi / inv_freq
        scaled = np.where(wavelen > low_wavelen, inv_freq / cfg.rope_factor, inv_freq)
        smooth = (old_len / wavelen - cfg.rope_low_freq_factor) / (cfg.rope_high_freq_factor - cfg.rope_low_freq_factor)
        smoothed = (1 - smooth) * scaled / cfg.rope_factor + smooth * scaled
        is_medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        inv_freq = np.where(is_medium, smoothed, scaled)
    return inv_freq.astype(np.float32)


def rope_angles(positions: jax.Array, cfg: ModelConfig) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, L, head_dim] for the given per-token positions.

    cos and sin are the two iterations of a `lax.map`. A loop body is a fusion boundary, so XLA
    writes each table once into a buffer. Left to XLA's CPU fusion, the float32 cos/sin were
    re-evaluated inside every consumer: per head, for q and k, forward and backward, in every
    layer (~10% of a float32 7M-parameter training step; docs/training.md, "CPU performance").
    `lax.optimization_barrier` does not prevent that: XLA strips it before fusing. The loop runs
    over a new leading axis, so the batch dimension keeps its sharding.
    """
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg))
    cos, sin = jax.lax.map(lambda i: jax.lax.switch(i, (jnp.cos, jnp.sin), freqs), jnp.arange(2))
    # Both halves of the rotate-half tables carry the same angles.
    return jnp.concatenate([cos, cos], axis=-1), jnp.concatenate([sin, sin], axis=-1)


@jax.custom_vjp
def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotate-half RoPE on x [B, L, heads, head_dim] (the layout of HF Llama checkpoints).

    RoPE is a rotation, so its gradient is the inverse rotation: RoPE with -sin (both halves of
    the tables carry the same angles, see rope_angles). Written out because autodiff of the
    rotate-half concatenation pads and adds each half separately, with a bf16 rounding after
    every step; cos and sin come from integer positions and get no gradient.
    """
    return _rotate(x, cos, sin)


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    cos, sin = cos[:, :, None, :].astype(x.dtype), sin[:, :, None, :].astype(x.dtype)
    return x * cos + rotated * sin


def _apply_rope_fwd(x, cos, sin):
    return _rotate(x, cos, sin), (cos, sin)


def _apply_rope_bwd(residuals, d_out):
    cos, sin = residuals
    return _rotate(d_out, cos, -sin), None, None


apply_rope.defvjp(_apply_rope_fwd, _apply_rope_bwd)


# ---------------------------------------------------------------------- attention mask
def attention_mask(
    segment_ids: jax.Array, prefix_mask: jax.Array | None = None, sliding_window: int = 0
) -> jax.Array:
    """[B, 1, L, L] boolean: may query i attend to key j?

    Same segment and causal (j <= i); prefix-LM tokens of one segment also see each other;
    with a sliding window only the last `sliding_window` tokens. Segments are contiguous, so
    index distance equals position distance inside a segment.
    """
    idx = jnp.arange(segment_ids.shape[-1])
    same_segment = segment_ids[:, :, None] == segment_ids[:, None, :]
    visible = idx[None, :, None] >= idx[None, None, :]
    if prefix_mask is not None:
        prefix = prefix_mask.astype(bool)
        visible = visible | (prefix[:, :, None] & prefix[:, None, :])
    mask = same_segment & visible
    if sliding_window:
        mask = mask & (idx[None, :, None] - idx[None, None, :] < sliding_window)
    return mask[:, None, :, :]


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Plain softmax attention with grouped-query heads, float32 scores; the tests' reference.

    q [B, T, H, D], k/v [B, S, KV, D], mask [B, 1, T, S] -> [B, T, H, D].
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    scores = jnp.where(mask[:, :, None, :, :], scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k = Dense((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v = Dense((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.o = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), use_bias=cfg.out_bias, cfg=cfg, rngs=rngs)

    def __call__(self, x, rope, mask, cache: LayerCache | None = None, cache_index=None, causal: bool = False):
        cfg = self.cfg
        q = sharding.constrain(self.q(x), ("batch", "length", "act_heads", None))
        k = sharding.constrain(self.k(x), ("batch", "length", "act_kv_heads", None))
        v = sharding.constrain(self.v(x), ("batch", "length", "act_kv_heads", None))
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        if cache is not None:
            start = (0, cache_index, 0, 0)
            k = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
            v = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
            cache = (k, v)
        if cfg.attention == "reference":
            out = reference_attention(q, k, v, mask)
        elif cfg.attention == "xla" and causal and cache is None:
            # Faster than jax.nn.dot_product_attention's XLA path on CPU (see docs/training.md).
            out = causal_block_attention(q, k, v, mask)
        else:
            # cuDNN's fused kernel targets training shapes; one-token decode steps use XLA's.
            implementation = "xla" if cache is not None and q.shape[1] == 1 else cfg.attention
            # is_causal changes nothing in the result (the mask is already causal then), but lets
            # cuDNN skip the blocks above the diagonal instead of computing and masking them.
            is_causal = causal and cache is None and implementation == "cudnn"
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=implementation)
        out = sharding.constrain(out, ("batch", "length", "act_heads", None))
        return self.o(out), cache


class MLP(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f = cfg.d_model, cfg.d_ff
        self.gate = Dense((d,), (f,), ("embed", "mlp"), use_bias=cfg.mlp_bias, cfg=cfg, rngs=rngs) if cfg.gated_mlp else None
        self.up = Dense((d,), (f,), ("embed", "mlp"), use_bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)
        self.down = Dense((f,), (d,), ("mlp", "embed"), use_bias=cfg.mlp_bias, cfg=cfg, rngs=rngs)

    def activation(self, x: jax.Array) -> jax.Array:
        if self.cfg.activation == "silu":
            return jax.nn.silu(x)
        return jax.nn.gelu(x, approximate=self.cfg.activation == "gelu_tanh")

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.activation(self.up(x) if self.gate is None else self.gate(x))
        if self.gate is not None:
            h = h * self.up(x)
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm residual block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, rope, mask, cache: LayerCache | None = None, cache_index=None, causal: bool = False):
        h, cache = self.attn(self.attn_norm(x), rope, mask, cache, cache_index, causal)
        x = sharding.constrain(x + h, ("batch", "length", "act_embed"))
        x = x + self.mlp(self.mlp_norm(x))
        return sharding.constrain(x, ("batch", "length", "act_embed")), cache


def _run_block(block: Block, x, rope, mask, cache, cache_index):
    return block(x, rope, mask, cache, cache_index)


def _run_causal_block(block: Block, x, rope, mask, cache, cache_index):
    # A separate function rather than a flag: nnx.remat traces every argument.
    return block(x, rope, mask, cache, cache_index, causal=True)


_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,  # keep weight matmul outputs
}


SCALAR_HEADS = ("score", "value")  # reward model (HF *ForSequenceClassification's `score`), PPO value head


class Transformer(nnx.Module):
    """Token embedding -> n_layers pre-norm blocks -> final norm -> vocabulary logits.

    `heads` adds scalar heads read from the final hidden states beside the vocabulary head
    (`scalar_head`): "score" for a reward model, "value" for a PPO value function. They are
    created after every other parameter, so asking for one leaves the initialisation of the rest
    unchanged.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, heads: tuple[str, ...] = ()):
        unknown = sorted(set(heads) - set(SCALAR_HEADS))
        if unknown:
            raise ValueError(f"Transformer: unknown head(s) {unknown}; the decoder carries {SCALAR_HEADS}")
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = _param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        if cfg.position == "learned":
            self.pos_embed = _param(rngs, init, (cfg.max_positions, cfg.d_model), ("positions", "embed"), cfg)
        else:
            self.pos_embed = None
        self.layers = nnx.List([Block(cfg, rngs) for _ in range(cfg.n_layers)])
        self.final_norm = Norm(cfg, rngs)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:
            self.lm_head = _param(rngs, init, (cfg.d_model, cfg.vocab_size), ("embed", "vocab"), cfg)
        self.scalar_heads = (
            nnx.Dict({name: _param(rngs, init, (cfg.d_model, 1), ("embed", None), cfg) for name in heads})
            if heads else None
        )

    def __call__(
        self,
        input_tokens: jax.Array,
        *,
        positions: jax.Array | None = None,
        segment_ids: jax.Array | None = None,
        prefix_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Logits [B, L, vocab] in float32 for a (packed) batch; see the module docstring."""
        if segment_ids is None:
            segment_ids = jnp.ones(input_tokens.shape, jnp.int32)
        if positions is None:
            positions = jnp.broadcast_to(jnp.arange(input_tokens.shape[-1], dtype=jnp.int32), input_tokens.shape)
        mask = attention_mask(segment_ids, prefix_mask, self.cfg.sliding_window)
        causal = prefix_mask is None  # then no query sees a later key (see attention_mask)
        logits, _ = self.forward(input_tokens, positions, mask, causal=causal)
        return logits

    def hidden_states(
        self,
        input_tokens: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array,
        prefix_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(final-norm hidden states [B, L, d_model], output head [d_model, vocab]), compute dtype.

        `hidden @ head` are `__call__`'s logits. The trainer takes these two instead of the logits
        so its loss can own the head matmul's backward pass (losses.head_cross_entropy).
        """
        mask = attention_mask(segment_ids, prefix_mask, self.cfg.sliding_window)
        x, _ = self._features(input_tokens, positions, mask, None, None, prefix_mask is None)
        return x, self._head()

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array,
        cache: list[LayerCache] | None = None,
        cache_index: jax.Array | int | None = None,
        *,
        causal: bool = False,
    ) -> tuple[jax.Array, list[LayerCache] | None]:
        """The model with an explicit attention mask [B, 1, L, S] and optional KV cache.

        `causal=True` promises that `mask` lets no query see a later key, so attention may skip
        those blocks (`causal_block_attention`).
        """
        x, new_cache = self._features(tokens, positions, mask, cache, cache_index, causal)
        logits = jnp.dot(x, self._head(), preferred_element_type=jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "act_vocab")), new_cache

    def scalar_head(self, name: str, hidden: jax.Array) -> jax.Array:
        """The scalar head `name` at every position: [B, L] float32 from `hidden_states`' output."""
        if self.scalar_heads is None or name not in self.scalar_heads:
            have = [] if self.scalar_heads is None else sorted(self.scalar_heads)
            raise KeyError(f"This model has no {name!r} head (it has {have}); build it with heads=({name!r},)")
        weight = self.scalar_heads[name][...].astype(hidden.dtype)
        return jnp.dot(hidden, weight, preferred_element_type=jnp.float32)[..., 0]

    def _head(self) -> jax.Array:
        """The output projection [d_model, vocab] in the compute dtype (tied: the embedding^T)."""
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return head.astype(jnp.dtype(self.cfg.dtype))

    def _features(self, tokens, positions, mask, cache, cache_index, causal: bool):
        """Embedding, blocks and final norm: the hidden states the head is applied to."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(self.embed[...], tokens, axis=0).astype(dtype)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.embed_multiplier, dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dtype)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        rope = rope_angles(positions, cfg) if cfg.position == "rope" else None

        run_block = _run_causal_block if causal else _run_block
        if cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=True)
        new_cache = [] if cache is not None else None
        for i, block in enumerate(self.layers):
            x, layer_cache = run_block(block, x, rope, mask, None if cache is None else cache[i], cache_index)
            if new_cache is not None:
                new_cache.append(layer_cache)

        return self.final_norm(x), new_cache

    def init_cache(self, batch: int, length: int) -> list[LayerCache]:
        """Zeroed KV cache for `batch` rows of `length` tokens, in the compute dtype."""
        cfg = self.cfg
        shape = (batch, length, cfg.n_kv_heads, cfg.head_dim)
        return [(jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype))) for _ in range(cfg.n_layers)]


def logical_axes(model: nnx.Module) -> Any:
    """Like `nnx.state(model, nnx.Param)`, with each parameter replaced by its logical axis names."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: v.logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
