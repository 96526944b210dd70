"""T5 (v1.1 / FLAN-T5, the original T5, mT5's shape): the encoder-decoder family, in Flax NNX.

Read top to bottom: relative position buckets, masks, dropout, attention, feed-forward, the
encoder and decoder blocks, the stacks, the model. Parameters carry logical axes like the
decoder's (transformer.py), so the trainer shards both families with the same rules table.

What makes it T5:
- RMS norm without mean or bias (the decoder's `Norm` reading T5Config's fixed switches), pre-norm
  residual blocks; no biases anywhere.
- Attention does not divide q.k by sqrt(head_dim) (T5 folds that into the initialisation).
- A relative position bias: a [buckets, heads] table per stack, looked up by the bucketed distance
  key - query and added to the self-attention scores of every layer of that stack; bidirectional
  buckets in the encoder, causal ones in the decoder; no bias in cross-attention. Mesh TF and
  Hugging Face keep the table in the first layer and pass the computed bias on to the others; it is
  the same single tensor here (it maps to HF's first-layer tensor), held by the stack beside its
  layers so that every layer has the same parameters.
- Gated-GELU feed-forward (v1.1) or ReLU (original T5); shared token embedding; an untied output
  head without rescaling (v1.1), or the tied head seeing d_model**-0.5 * hidden (original).
- Dropout (`T5Config.dropout_rate`) where Hugging Face / Mesh TF apply it: embeddings, attention
  probabilities, inside the FFN, each residual branch, the final norm. It needs a key
  (`dropout_rng`); without one the model is deterministic (evaluation, generation).

Packing the t5x way: encoder and decoder rows each carry segment ids (1, 2, ... per example,
0 = padding) and positions restarting at 0 per example. Self-attention stays inside a segment (the
decoder's causally), cross-attention links decoder segment s to encoder segment s only, and
relative positions are differences of the per-token positions, so an example packed with others
computes what it computes alone (tests/test_t5.py).

Layers: unrolled (each stack's `layers` is an `nnx.List` of blocks, run by a Python loop) or
scanned (`cfg.scanned`: one block per stack whose parameters have a leading `[layers]` axis, run by
`lax.scan`, layer_stack.py), as in the decoder family. Every layer of a stack has the same
parameters (the relative position table is the stack's, beside its layers), so one scan body serves
a whole stack; both layouts compute the same function, dropout included (each layer folds its own
index into the key either way), and model/layout.py converts their parameters.

Parameter names (LoRA targets select them by name; scanned, without the `<i>/`):
  embed, lm_head (absent when tied)
  {encoder,decoder}/rel_bias, {encoder,decoder}/final_norm/scale
  {encoder,decoder}/layers/<i>/attn_norm/scale, .../attn/{q,k,v,o}/kernel
  decoder/layers/<i>/cross_norm/scale, .../cross_attn/{q,k,v,o}/kernel
  {encoder,decoder}/layers/<i>/mlp_norm/scale, .../mlp/{gate,up,down}/kernel
Hugging Face's wi_0 is `gate` (the activated half), wi_1 is `up`, wo is `down`; the ungated
original T5's wi is `up`.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from flan_jax import sharding
from flan_jax.model import layer_stack
from flan_jax.model.t5_config import T5Config
from flan_jax.model.transformer import _REMAT_POLICIES, Dense, Norm, _write_cache, gated_activation, gathered_table

_MASKED = float(jnp.finfo(jnp.float32).min)

# Keys and values of one attention: (keys, values), each [batch, length, heads, head_dim], or head-major
# [batch, heads, length, head_dim] when decoding (the self-attention cache and the precomputed
# cross-attention ones): each step then reads them without a transposed copy. A scanned decoder's
# self-attention cache is (keys, values, layer index) with the whole stack's [layers, batch, heads,
# length, head_dim] arrays, written in place at the layer's row (transformer._write_cache).
LayerCache = tuple[jax.Array, ...]
# A decoder's cache (self-attention, or the cross-attention keys/values): one LayerCache per layer
# (unrolled), or (keys, values) with a leading layer axis (scanned).
Cache = list[LayerCache] | tuple[jax.Array, jax.Array]


# ---------------------------------------------------------------------- relative positions
def relative_position_bucket(relative: jax.Array, *, bidirectional: bool, num_buckets: int, max_distance: int) -> jax.Array:
    """Mesh TF's bucket of each relative position (key position - query position), int32.

    Half of the buckets (per direction when bidirectional) are exact distances 0, 1, ...; the
    rest grow logarithmically up to `max_distance`; farther distances share the last bucket. In the
    causal decoder, keys after the query (positive distances) all fall in bucket 0, and are masked.
    Computed in float32 like transformers, which it matches bucket for bucket.
    """
    relative = relative.astype(jnp.int32)
    buckets = jnp.zeros_like(relative)
    if bidirectional:
        num_buckets //= 2
        buckets = buckets + (relative > 0).astype(jnp.int32) * num_buckets
        distance = jnp.abs(relative)
    else:
        distance = -jnp.minimum(relative, 0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log(0) = -inf only where is_small selects the exact bucket.
    scaled = jnp.log(jnp.maximum(distance, 1).astype(jnp.float32) / max_exact) / math.log(max_distance / max_exact)
    large = max_exact + (scaled * (num_buckets - max_exact)).astype(jnp.int32)
    large = jnp.minimum(large, num_buckets - 1)
    return buckets + jnp.where(is_small, distance, large)


def position_bias(table: jax.Array, query_positions: jax.Array, key_positions: jax.Array, *, bidirectional: bool,
                  cfg: T5Config) -> jax.Array:
    """[B, heads, T, S] float32 bias from the [buckets, heads] table and per-token positions [B, T], [B, S]."""
    relative = key_positions[:, None, :] - query_positions[:, :, None]
    buckets = relative_position_bucket(
        relative, bidirectional=bidirectional, num_buckets=cfg.relative_buckets, max_distance=cfg.relative_max_distance
    )
    values = jnp.take(table.astype(jnp.float32), buckets, axis=0)  # [B, T, S, heads]
    return values.transpose(0, 3, 1, 2)


def segment_mask(query_segments: jax.Array, key_segments: jax.Array, *, causal: bool = False) -> jax.Array:
    """[B, 1, T, S] boolean: same segment (padding, segment 0, sees only padding), and j <= i if causal."""
    mask = query_segments[:, :, None] == key_segments[:, None, :]
    if causal:
        idx_q = jnp.arange(query_segments.shape[-1])
        idx_k = jnp.arange(key_segments.shape[-1])
        mask = mask & (idx_q[None, :, None] >= idx_k[None, None, :])
    return mask[:, None]


# ---------------------------------------------------------------------- dropout
def _key(rng: jax.Array | None, *sites: int) -> jax.Array | None:
    """An independent key per dropout site (None stays None: deterministic)."""
    for site in sites:
        rng = None if rng is None else jax.random.fold_in(rng, site)
    return rng


def dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout; the identity without a key or at rate 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)


# ---------------------------------------------------------------------- attention
def attend(q: jax.Array, k: jax.Array, v: jax.Array, bias: jax.Array | None, mask: jax.Array, cfg: T5Config,
           rng: jax.Array | None = None, *, head_major: bool = False) -> jax.Array:
    """Unscaled softmax attention with an additive bias: q [B, T, H, D], k/v [B, S, H, D] (or
    [B, H, S, D] with `head_major`) -> [B, T, H, D].

    Scores and softmax in float32, matmul operands in the compute dtype. `attention="cudnn"` uses
    jax.nn.dot_product_attention's fused kernel when no dropout is applied to the probabilities.
    """
    if cfg.attention == "cudnn" and not head_major and (rng is None or cfg.dropout_rate == 0.0):
        return fused_attention(q, k, v, bias, mask, implementation="cudnn")
    kv = "bhsd" if head_major else "bshd"
    scores = jnp.einsum(f"bthd,{kv}->bhts", q, k, preferred_element_type=jnp.float32)
    if bias is not None:
        scores = scores + bias
    scores = jnp.where(mask, scores, _MASKED)
    probs = dropout(jax.nn.softmax(scores, axis=-1), cfg.dropout_rate, rng)
    out = jnp.einsum(f"bhts,{kv}->bthd", probs.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return out.astype(v.dtype)


def fused_attention(q, k, v, bias, mask, *, implementation: str | None) -> jax.Array:
    """`attend` through jax.nn.dot_product_attention (scale 1, the bias in q's dtype)."""
    if bias is not None:
        bias = jnp.broadcast_to(bias, (q.shape[0], *bias.shape[1:])).astype(q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask, scale=1.0, implementation=implementation)


class T5Attention(nnx.Module):
    """q, k, v, o projections; self-attention (keys from the same stream) or cross-attention."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, hd, s = cfg.d_model, cfg.n_heads, cfg.head_dim, cfg.init_scale
        dense = dict(use_bias=False, cfg=cfg, rngs=rngs)
        # Hugging Face's / Mesh TF's initialisation: the missing 1/sqrt(head_dim) lives in q's std.
        self.q = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), std=s * (d * hd) ** -0.5, **dense)
        self.k = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), std=s * d**-0.5, **dense)
        self.v = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), std=s * d**-0.5, **dense)
        self.o = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), std=s * (h * hd) ** -0.5, **dense)

    def keys_values(self, x: jax.Array) -> LayerCache:
        k = sharding.constrain(self.k(x), ("batch", "length", "act_heads", None))
        v = sharding.constrain(self.v(x), ("batch", "length", "act_heads", None))
        return k, v

    def __call__(self, x, keys_values: LayerCache, bias, mask, rng=None, cache: LayerCache | None = None, cache_index=None,
                 *, head_major: bool = False):
        """`keys_values` of this attention (head-major with `head_major`); with a (head-major)
        `cache`, they are this step's keys/values, written into the cache at `cache_index` first."""
        q = sharding.constrain(self.q(x), ("batch", "length", "act_heads", None))
        k, v = keys_values
        if cache is not None:
            cache, k, v = _write_cache(cache, k, v, cache_index)
            head_major = True
        out = attend(q, k, v, bias, mask, self.cfg, rng, head_major=head_major)
        out = sharding.constrain(out, ("batch", "length", "act_heads", None))
        return self.o(out), cache


# ---------------------------------------------------------------------- feed-forward
_ACTIVATIONS = {
    "relu": jax.nn.relu,
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "silu": jax.nn.silu,
}


class T5MLP(nnx.Module):
    """down(act(gate(x)) * up(x)) (v1.1), or down(act(up(x))) (original T5); dropout before down."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.cfg = cfg
        d, f, s = cfg.d_model, cfg.d_ff, cfg.init_scale
        dense = dict(use_bias=False, cfg=cfg, rngs=rngs)
        self.gate = Dense((d,), (f,), ("embed", "mlp"), std=s * d**-0.5, **dense) if cfg.gated_mlp else None
        self.up = Dense((d,), (f,), ("embed", "mlp"), std=s * d**-0.5, **dense)
        self.down = Dense((f,), (d,), ("mlp", "embed"), std=s * f**-0.5, **dense)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        act = _ACTIVATIONS[self.cfg.activation]
        h = gated_activation(act, None if self.gate is None else self.gate(x), self.up(x))
        h = sharding.constrain(dropout(h, self.cfg.dropout_rate, rng), ("batch", "length", "act_mlp"))
        return self.down(h)


# ---------------------------------------------------------------------- blocks
def _residual(x: jax.Array, branch: jax.Array, rate: float, rng) -> jax.Array:
    return sharding.constrain(x + dropout(branch, rate, rng), ("batch", "length", "act_embed"))


class EncoderBlock(nnx.Module):
    """x + attn(norm(x)) (bidirectional, relative bias), then x + mlp(norm(x))."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = T5Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = T5MLP(cfg, rngs)

    def __call__(self, x, bias, mask, rng=None):
        rate = self.attn.cfg.dropout_rate
        h = self.attn_norm(x)
        h, _ = self.attn(h, self.attn.keys_values(h), bias, mask, _key(rng, 0))
        x = _residual(x, h, rate, _key(rng, 1))
        return _residual(x, self.mlp(self.mlp_norm(x), _key(rng, 2)), rate, _key(rng, 3))


class DecoderBlock(nnx.Module):
    """Causal self-attention (relative bias, optional KV cache), cross-attention, feed-forward."""

    def __init__(self, cfg: T5Config, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg, rngs)
        self.attn = T5Attention(cfg, rngs)
        self.cross_norm = Norm(cfg, rngs)
        self.cross_attn = T5Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg, rngs)
        self.mlp = T5MLP(cfg, rngs)

    def __call__(self, x, encoded_kv: LayerCache, bias, mask, cross_mask, rng=None, cache=None, cache_index=None):
        rate = self.attn.cfg.dropout_rate
        h = self.attn_norm(x)
        h, cache = self.attn(h, self.attn.keys_values(h), bias, mask, _key(rng, 0), cache, cache_index)
        x = _residual(x, h, rate, _key(rng, 1))
        # Decoding (a cache) reads the cross-attention keys/values precomputed head-major.
        h, _ = self.cross_attn(self.cross_norm(x), encoded_kv, None, cross_mask, _key(rng, 2), head_major=cache is not None)
        x = _residual(x, h, rate, _key(rng, 3))
        return _residual(x, self.mlp(self.mlp_norm(x), _key(rng, 4)), rate, _key(rng, 5)), cache


def _run_encoder_block(block, x, bias, mask, rng):
    return block(x, bias, mask, rng)


def _run_decoder_block(block, x, encoded, bias, mask, cross_mask, rng):
    # Training: the cross-attention keys/values are projected inside the (rematerialised) block.
    return block(x, block.cross_attn.keys_values(encoded), bias, mask, cross_mask, rng)[0]


class T5Stack(nnx.Module):
    """The layers of the encoder or the decoder, their shared relative position table and final norm."""

    def __init__(self, cfg: T5Config, n_layers: int, *, decoder: bool, rngs: nnx.Rngs):
        self.cfg = cfg
        self.decoder = decoder
        self.n_layers = n_layers
        # One static kind for every layer: a scanned stack is one scan over all its layers.
        self.kinds = ("decoder" if decoder else "encoder",) * n_layers
        init = nnx.initializers.normal(cfg.init_scale * cfg.d_model**-0.5)
        table = init(rngs.params(), (cfg.relative_buckets, cfg.n_heads), jnp.dtype(cfg.param_dtype))
        self.rel_bias = nnx.Param(table, logical_axes=(None, "heads"))
        block = DecoderBlock if decoder else EncoderBlock
        blocks = [block(cfg, rngs) for _ in range(n_layers)]
        self.layers = layer_stack.stack_modules(blocks) if cfg.scanned else nnx.List(blocks)
        self.final_norm = Norm(cfg, rngs)

    def bias(self, query_positions: jax.Array, key_positions: jax.Array) -> jax.Array:
        return position_bias(self.rel_bias[...], query_positions, key_positions, bidirectional=not self.decoder, cfg=self.cfg)

    def _remat(self, fn):
        if self.cfg.remat == "none":
            return fn
        return nnx.remat(fn, policy=_REMAT_POLICIES[self.cfg.remat], prevent_cse=True)

    def scan(self, body: layer_stack.LayerBody, x: jax.Array, cache=None, *, remat: bool = False):
        """A scanned stack's layers in order (layer_stack.run_stacked), each rematerialised with
        `remat` as the unrolled loop's blocks are; returns (x, cache)."""
        policy = _REMAT_POLICIES.get(self.cfg.remat)
        return layer_stack.run_stacked(self.layers, self.kinds, body, x, cache, remat=remat, policy=policy)

    def encode(self, x, positions, segment_ids, rng=None):
        bias = self.bias(positions, positions)
        mask = segment_mask(segment_ids, segment_ids)
        if self.cfg.scanned:
            def body(block, x, cache, index, kind):
                return _run_encoder_block(block, x, bias, mask, _key(rng, index)), cache

            x, _ = self.scan(body, x, remat=self.cfg.remat != "none")
        else:
            run = self._remat(_run_encoder_block)
            for i, block in enumerate(self.layers):
                x = run(block, x, bias, mask, _key(rng, i))
        return dropout(self.final_norm(x), self.cfg.dropout_rate, _key(rng, self.n_layers))

    def decode(self, x, positions, segment_ids, encoded, encoder_segment_ids, rng=None):
        bias = self.bias(positions, positions)
        mask = segment_mask(segment_ids, segment_ids, causal=True)
        cross_mask = segment_mask(segment_ids, encoder_segment_ids)
        if self.cfg.scanned:
            def body(block, x, cache, index, kind):
                return _run_decoder_block(block, x, encoded, bias, mask, cross_mask, _key(rng, index)), cache

            x, _ = self.scan(body, x, remat=self.cfg.remat != "none")
        else:
            run = self._remat(_run_decoder_block)
            for i, block in enumerate(self.layers):
                x = run(block, x, encoded, bias, mask, cross_mask, _key(rng, i))
        return dropout(self.final_norm(x), self.cfg.dropout_rate, _key(rng, self.n_layers))


# ---------------------------------------------------------------------- the model
class T5(nnx.Module):
    """Shared embedding -> encoder stack; embedding -> decoder stack (cross-attending) -> head.

    `__call__` / `hidden_states` take the features of the "encdec" converter
    (flan_jax.data.converters.encdec) by name; segment ids and positions default to one unpadded
    example per row. Generation (model/t5_generate.py) uses `encode`, `cross_keys_values`,
    `init_cache` and `decode_step`: the encoder runs once, the decoder with a KV cache.
    """

    def __init__(self, cfg: T5Config, *, rngs: nnx.Rngs, heads: tuple[str, ...] = ()):
        if heads:
            raise ValueError(f"T5: output head(s) {sorted(heads)} are not supported; the t5 family has its language-model head only")
        # A built model's config says its layout (`scan_layers=None` resolves by depth, dtype and
        # backend), as the decoder's does.
        cfg = cfg if cfg.scan_layers is not None else cfg.replace(scan_layers=cfg.scanned)
        self.cfg = cfg
        dtype = jnp.dtype(cfg.param_dtype)
        self.embed = nnx.Param(
            nnx.initializers.normal(cfg.init_scale)(rngs.params(), (cfg.vocab_size, cfg.d_model), dtype),
            logical_axes=("vocab", "embed"),
        )
        self.encoder = T5Stack(cfg, cfg.n_layers, decoder=False, rngs=rngs)
        self.decoder = T5Stack(cfg, cfg.n_decoder_layers, decoder=True, rngs=rngs)
        if cfg.tie_embeddings:
            self.lm_head = None
        else:  # t5x's init of the untied head (variance scaling, fan-in d_model)
            head = nnx.initializers.normal(cfg.init_scale * cfg.d_model**-0.5)(rngs.params(), (cfg.d_model, cfg.vocab_size), dtype)
            self.lm_head = nnx.Param(head, logical_axes=("embed", "vocab"))

    # ------------------------------------------------------------------ training / scoring
    def __call__(self, **features: Any) -> jax.Array:
        """Logits [B, decoder length, vocab] in float32 (keyword features, see `hidden_states`)."""
        hidden, head = self.hidden_states(**features)
        logits = jnp.dot(hidden, head, preferred_element_type=jnp.float32)
        return sharding.constrain(logits, ("batch", "length", "act_vocab"))

    def hidden_states(
        self,
        *,
        encoder_input_tokens: jax.Array,
        decoder_input_tokens: jax.Array,
        encoder_positions: jax.Array | None = None,
        encoder_segment_ids: jax.Array | None = None,
        decoder_positions: jax.Array | None = None,
        decoder_segment_ids: jax.Array | None = None,
        dropout_rng: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(decoder hidden states [B, Ld, d_model], head [d_model, vocab]) in the compute dtype.

        `hidden @ head` are the logits; the trainer's loss takes the two so it can own the head
        matmul's backward pass (train/losses.head_cross_entropy). With the original T5's rescale,
        the hidden states are already multiplied by d_model**-0.5.
        """
        enc_pos, enc_seg = _defaults(encoder_input_tokens, encoder_positions, encoder_segment_ids)
        dec_pos, dec_seg = _defaults(decoder_input_tokens, decoder_positions, decoder_segment_ids)
        encoded = self.encode(encoder_input_tokens, enc_pos, enc_seg, _key(dropout_rng, 0))
        x = self._embed(decoder_input_tokens, _key(dropout_rng, 1))
        x = self.decoder.decode(x, dec_pos, dec_seg, encoded, enc_seg, _key(dropout_rng, 2))
        return self._scale(x), self._head()

    def encode(self, tokens: jax.Array, positions: jax.Array, segment_ids: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        """The encoder's output [B, Le, d_model] (final norm applied), compute dtype."""
        return self.encoder.encode(self._embed(tokens, _key(rng, 0)), positions, segment_ids, _key(rng, 1))

    # ------------------------------------------------------------------ generation
    def cross_keys_values(self, encoded: jax.Array) -> Cache:
        """Every decoder layer's cross-attention keys/values of the encoder output, computed once,
        head-major ([B, heads, Le, head_dim]; scanned: stacked, [layers, B, heads, Le, head_dim])
        for the decoding steps."""
        def of(block):
            return tuple(x.transpose(0, 2, 1, 3) for x in block.cross_attn.keys_values(encoded))

        if self.cfg.scanned:
            return layer_stack.map_layers(self.decoder.layers, of)
        return [of(block) for block in self.decoder.layers]

    def init_cache(self, batch: int, length: int) -> Cache:
        """Zeroed decoder self-attention cache, head-major [batch, heads, length, head_dim] per layer
        (scanned: (keys, values) with a leading layer axis), compute dtype."""
        cfg = self.cfg
        shape = (batch, cfg.n_heads, length, cfg.head_dim)
        if cfg.scanned:
            shape = (cfg.n_decoder_layers, *shape)
            return jnp.zeros(shape, jnp.dtype(cfg.dtype)), jnp.zeros(shape, jnp.dtype(cfg.dtype))
        zeros = lambda: jnp.zeros(shape, jnp.dtype(cfg.dtype))  # noqa: E731
        return [(zeros(), zeros()) for _ in range(cfg.n_decoder_layers)]

    def decode_step(self, tokens, step, cache: Cache, cross_kv: Cache, cross_mask):
        """One decoding step for every row: tokens [B, 1] at position `step` (cache slot `step`).

        cross_mask [B, 1, 1, Le] marks the encoder positions each row may read. Returns the logits
        [B, vocab] (float32) of the next token and the updated cache.
        """
        slots = jnp.arange(cache[0][0].shape[2])  # the cache length (layer 0's keys, or row 0 of the stacked keys)
        bias = self.decoder.bias(jnp.reshape(step, (1, 1)), slots[None, :])  # [1, H, 1, S]: all rows alike
        mask = (slots <= step)[None, None, None, :]
        x = self._embed(tokens, None)
        if self.cfg.scanned:
            cross_keys, cross_values = cross_kv

            def body(block, x, stacked_cache, index, kind):
                kv = (cross_keys[index], cross_values[index])
                x, layer_cache = block(x, kv, bias, mask, cross_mask, None, (*stacked_cache, index), step)
                return x, layer_cache[:2]

            x, new_cache = self.decoder.scan(body, x, cache)
        else:
            new_cache = []
            for block, layer_cache, kv in zip(self.decoder.layers, cache, cross_kv):
                x, layer_cache = block(x, kv, bias, mask, cross_mask, None, layer_cache, step)
                new_cache.append(layer_cache)
        hidden = self._scale(self.decoder.final_norm(x))
        return jnp.dot(hidden[:, -1], self._head(), preferred_element_type=jnp.float32), new_cache

    # ------------------------------------------------------------------ pieces
    def _embed(self, tokens: jax.Array, rng) -> jax.Array:
        # Cast, then gather the embed dimension before the lookup, as the decoder does (gathered_table).
        x = jnp.take(gathered_table(self.embed[...], jnp.dtype(self.cfg.dtype), "vocab"), tokens, axis=0)
        return sharding.constrain(dropout(x, self.cfg.dropout_rate, rng), ("batch", "length", "act_embed"))

    def _scale(self, hidden: jax.Array) -> jax.Array:
        if self.cfg.scale_decoder_outputs:
            return hidden * jnp.asarray(self.cfg.d_model**-0.5, hidden.dtype)
        return hidden

    def _head(self) -> jax.Array:
        head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
        return head.astype(jnp.dtype(self.cfg.dtype))


def _defaults(tokens: jax.Array, positions: jax.Array | None, segment_ids: jax.Array | None) -> tuple[jax.Array, jax.Array]:
    """One unpadded example per row when the caller gives no positions / segment ids."""
    if segment_ids is None:
        segment_ids = jnp.ones(tokens.shape, jnp.int32)
    if positions is None:
        positions = jnp.broadcast_to(jnp.arange(tokens.shape[-1], dtype=jnp.int32), tokens.shape)
    return positions, segment_ids
