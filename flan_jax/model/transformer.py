"""The decoder-only transformer: config-driven, packed-sequence aware, in Flax NNX.

Read top to bottom: parameters with logical axes, norms, rotary embeddings, the attention mask,
attention, MLP, block, model. Llama 2/3, Mistral, Qwen2/3, Gemma 1/2/3, Phi-3, OLMo 2 and GPT-2
are all this one model with different `ModelConfig` switches (see config.py).

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

Layers: unrolled (`layers` is an `nnx.List` of blocks, run by a Python loop) or scanned
(`cfg.scanned`: one block whose parameters have a leading `[n_layers]` axis, run by `lax.scan`,
see layer_stack.py; `layout.py` converts between the two parameter layouts). Both compute the
same function. Each layer has a static `LayerKind` (`layer_kinds(cfg)`); layers of different
kinds get their own attention mask (a family that alternates local and global attention
declares it there).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flan_jax import sharding
from flan_jax.model import kernels, layer_stack
from flan_jax.model.config import ModelConfig
from flan_jax.model.kernels import rope as rope_kernels
from flan_jax.model.kernels.causal_attention import causal_block_attention
from flan_jax.model.kernels.matmul import dense_dot

# One layer's cache: (keys, values), each [batch, n_kv_heads, cache_len, head_dim] (head-major, so
# a decode step's attention reads it with no transposed copy); in a scanned model (keys, values,
# layer index) with keys/values [n_layers, batch, n_kv_heads, cache_len, head_dim] (the whole
# stack's cache, written in place at the layer's row).
LayerCache = tuple[jax.Array, ...]
# The whole model's cache: a list of LayerCaches (unrolled), or (keys, values) stacked (scanned).
Cache = list[LayerCache] | tuple[jax.Array, jax.Array]


def _write_cache(cache: LayerCache, k: jax.Array, v: jax.Array, index) -> tuple[LayerCache, jax.Array, jax.Array]:
    """Writes this call's keys/values [B, T, KV, D] at slot `index`; returns (new cache, all keys,
    all values), the latter two head-major [B, KV, S, D] like the cache."""
    k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)  # only this call's T tokens are transposed
    if len(cache) == 2:  # this layer's own buffers
        start = (0, 0, index, 0)
        keys = jax.lax.dynamic_update_slice(cache[0], k.astype(cache[0].dtype), start)
        values = jax.lax.dynamic_update_slice(cache[1], v.astype(cache[1].dtype), start)
        return (keys, values), keys, values
    all_keys, all_values, layer = cache  # the stacked cache of a scanned model: only this row changes
    start = (layer, 0, 0, index, 0)
    all_keys = jax.lax.dynamic_update_slice(all_keys, k[None].astype(all_keys.dtype), start)
    all_values = jax.lax.dynamic_update_slice(all_values, v[None].astype(all_values.dtype), start)
    return (all_keys, all_values, layer), all_keys[layer], all_values[layer]


@dataclasses.dataclass(frozen=True)
class LayerKind:
    """What may differ between a model's layers, as static (hashable) values.

    Gemma 2/3 (and Qwen with sliding layers) alternate sliding-window and full attention; Gemma 3's
    sliding layers also rotate with their own rope base. Layers of one kind share one attention
    mask and one rope table; a scanned model runs the repeating pattern of kinds (or each run of
    equal kinds) as the body of a scan (layer_stack.py), so a kind must stay a static value.
    """

    sliding_window: int = 0  # attend to the last N tokens only; 0: to every earlier token
    local_rope: bool = False  # Gemma 3's sliding layers: rope base cfg.local_rope_theta, unscaled


def layer_kinds(cfg: ModelConfig) -> tuple[LayerKind, ...]:
    """The kind of each layer of the model `cfg` describes: `cfg.layer_types` ("sliding" layers
    attend to the last `sliding_window` tokens, with the local rope base when the family has one),
    or every layer alike (sliding when `sliding_window` is set, as Mistral)."""
    if not cfg.layer_types:
        return (LayerKind(sliding_window=cfg.sliding_window),) * cfg.n_layers
    return tuple(
        LayerKind(sliding_window=cfg.sliding_window, local_rope=bool(cfg.local_rope_theta)) if kind == "sliding"
        else LayerKind() for kind in cfg.layer_types
    )


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
        self.axes = tuple(axes)
        self.dtype = jnp.dtype(cfg.dtype)
        self.kernel_choice = cfg.kernels
        init = nnx.initializers.normal(cfg.init_std if std is None else std)  # T5 sets a std per projection
        self.kernel = _param(rngs, init, (*in_shape, *out_shape), axes, cfg)
        if use_bias:
            bias_axes = axes[self.n_in:]
            self.bias = _param(rngs, nnx.initializers.zeros, tuple(out_shape), bias_axes, cfg)
        else:
            self.bias = None

    def __call__(self, x: jax.Array) -> jax.Array:
        y = dense_dot(x, self.kernel[...], self.n_in, self.dtype, kernels.resolve(self.kernel_choice), self.axes)
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

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs, shape: tuple[int, ...] | None = None,
                 axes: tuple[str, ...] = ("embed",)):
        # `shape`: the trailing dims normalised together (default (d_model,)); QK-norm normalises
        # each head's (head_dim,) or, as OLMo 2, all heads' (heads, head_dim) at once.
        self.cfg = cfg
        shape = shape or (cfg.d_model,)
        self.reduce = tuple(range(-len(shape), 0))
        scale_init = nnx.initializers.zeros if cfg.norm_scale_plus_one else nnx.initializers.ones
        self.scale = _param(rngs, scale_init, shape, axes, cfg)
        self.bias = _param(rngs, nnx.initializers.zeros, shape, axes, cfg) if cfg.norm_bias else None

    def __call__(self, x: jax.Array) -> jax.Array:
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x32 = x.astype(jnp.float32)
        if cfg.norm == "layer":
            x32 = x32 - jnp.mean(x32, axis=self.reduce, keepdims=True)
        y = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=self.reduce, keepdims=True) + cfg.norm_eps)
        scale = self.scale[...].astype(jnp.float32)
        y = y * (1.0 + scale if cfg.norm_scale_plus_one else scale)  # Gemma scales by 1 + w
        if self.bias is not None:
            y = y + self.bias[...].astype(jnp.float32)
        return y.astype(dtype)


# ---------------------------------------------------------------------- rotary embeddings
def rope_inverse_frequencies(cfg: ModelConfig, local: bool = False) -> np.ndarray:
    """Per-pair rotation frequencies, with Llama 3 / linear context scaling (as in HF).

    `local`: Gemma 3's sliding layers, which rotate with their own base and no scaling.
    """
    theta = cfg.local_rope_theta if local else cfg.rope_theta
    inv_freq = 1.0 / (theta ** (np.arange(0, cfg.head_dim, 2, dtype=np.float32) / cfg.head_dim))
    if local:
        return inv_freq.astype(np.float32)
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


def rope_angles(positions: jax.Array, cfg: ModelConfig, local: bool = False) -> tuple[jax.Array, jax.Array]:
    """cos, sin of shape [B, L, head_dim] for the given per-token positions (kernels/rope.py);
    `local`: Gemma 3's sliding layers' base (rope_inverse_frequencies)."""
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(rope_inverse_frequencies(cfg, local))
    return rope_kernels.tables(freqs, kernels.resolve(cfg.kernels))


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


def _attention_probs(scores: jax.Array, mask: jax.Array, softcap: float) -> jax.Array:
    """Softmax over keys of float32 scores [B, KV, G, T, S] (soft-capped first if `softcap`), with
    the keys `mask` [B, 1, T, S] hides given no weight."""
    if softcap:
        scores = softcap * jnp.tanh(scores / softcap)
    scores = jnp.where(mask[:, :, None, :, :], scores, jnp.finfo(jnp.float32).min)
    return jax.nn.softmax(scores, axis=-1)


def reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, softcap: float = 0.0) -> jax.Array:
    """Plain softmax attention with grouped-query heads, float32 scores; the tests' reference, and
    the kernel of soft-capped attention (Gemma 2: scores -> cap * tanh(scores / cap)).

    q [B, T, H, D], k/v [B, S, KV, D], mask [B, 1, T, S] -> [B, T, H, D].
    """
    b, t, h, d = q.shape
    kv = k.shape[2]
    q = q.reshape(b, t, kv, h // kv, d)
    scores = jnp.einsum("btkgd,bskd->bkgts", q, k, preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = _attention_probs(scores, mask, softcap).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v)
    return out.reshape(b, t, h, d)


def cached_attention(q: jax.Array, keys: jax.Array, values: jax.Array, mask: jax.Array, softcap: float = 0.0) -> jax.Array:
    """`reference_attention` over a head-major KV cache: q [B, T, H, D], keys/values [B, KV, S, D],
    mask [B, 1, T, S] -> [B, T, H, D].

    Both contractions have batch (B, KV) leading and contract the minor axis, so XLA reads the
    cache in place; attention over the [B, S, KV, D] layout transposed the whole cache of every
    layer at every decoding step (most of a small model's decode time on CPU).
    """
    b, t, h, d = q.shape
    kv = keys.shape[1]
    q = jnp.moveaxis(q.reshape(b, t, kv, h // kv, d), 1, 3)  # [B, KV, G, T, D]
    scores = jnp.einsum("bkgtd,bksd->bkgts", q, keys, preferred_element_type=jnp.float32) / math.sqrt(d)
    probs = _attention_probs(scores, mask, softcap).astype(values.dtype)
    out = jnp.einsum("bkgts,bksd->bkgtd", probs, values)
    return jnp.moveaxis(out, 3, 1).reshape(b, t, h, d)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        d, h, kv, hd = cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        self.q = Dense((d,), (h, hd), ("embed", "heads", "head_dim"), use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.k = Dense((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.v = Dense((d,), (kv, hd), ("embed", "kv_heads", "head_dim"), use_bias=cfg.qkv_bias, cfg=cfg, rngs=rngs)
        self.o = Dense((h, hd), (d,), ("heads", "head_dim", "embed"), use_bias=cfg.out_bias, cfg=cfg, rngs=rngs)
        if cfg.qk_norm == "head":  # Qwen3, Gemma 3: each head's q and k, one scale over head_dim
            self.q_norm = Norm(cfg, rngs, (hd,), ("head_dim",))
            self.k_norm = Norm(cfg, rngs, (hd,), ("head_dim",))
        elif cfg.qk_norm == "full":  # OLMo 2: all heads' features together
            self.q_norm = Norm(cfg, rngs, (h, hd), ("heads", "head_dim"))
            self.k_norm = Norm(cfg, rngs, (kv, hd), ("kv_heads", "head_dim"))
        else:
            self.q_norm = self.k_norm = None
        # Kernels scale scores by 1/sqrt(head_dim); Gemma's query_pre_attn_scalar asks for another.
        self.query_factor = math.sqrt(hd / cfg.query_scale) if cfg.query_scale and cfg.query_scale != hd else 1.0

    def __call__(self, x, rope, mask, cache: LayerCache | None = None, cache_index=None, causal: bool = False):
        cfg = self.cfg
        q = sharding.constrain(self.q(x), ("batch", "length", "act_heads", None))
        k = sharding.constrain(self.k(x), ("batch", "length", "act_kv_heads", None))
        v = sharding.constrain(self.v(x), ("batch", "length", "act_kv_heads", None))
        impl = kernels.resolve(cfg.kernels)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope_kernels.apply(q, *rope, impl), rope_kernels.apply(k, *rope, impl)
        if self.query_factor != 1.0:
            q = q * jnp.asarray(self.query_factor, q.dtype)
        if cache is not None:
            cache, keys, values = _write_cache(cache, k, v, cache_index)
            if cfg.attention == "cudnn" and q.shape[1] > 1 and not cfg.attn_softcap:
                # A prefill on cuDNN: its fused kernel never materialises the [T, S] scores.
                keys, values = jnp.swapaxes(keys, 1, 2), jnp.swapaxes(values, 1, 2)
                out = jax.nn.dot_product_attention(q, keys, values, mask=mask, implementation="cudnn")
            else:
                out = cached_attention(q, keys, values, mask, cfg.attn_softcap)
        elif cfg.attention == "reference" or cfg.attn_softcap:
            # Soft-capped scores (Gemma 2) always take the einsum path: neither the CPU causal-block
            # kernel nor jax.nn.dot_product_attention (XLA, cuDNN) can cap them.
            out = reference_attention(q, k, v, mask, cfg.attn_softcap)
        elif cfg.attention == "xla" and causal and impl == "cpu":
            # Faster than jax.nn.dot_product_attention's XLA path on CPU (see docs/training.md).
            out = causal_block_attention(q, k, v, mask)
        else:
            # is_causal changes nothing in the result (the mask is already causal then), but lets
            # cuDNN skip the blocks above the diagonal instead of computing and masking them.
            is_causal = causal and cfg.attention == "cudnn"
            out = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=is_causal, implementation=cfg.attention)
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
        h = gated_activation(self.activation, None if self.gate is None else self.gate(x), self.up(x))
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        return self.down(h)


def gated_activation(act: Callable[[jax.Array], jax.Array], gate: jax.Array | None, up: jax.Array) -> jax.Array:
    """`act(gate) * up` (a gated MLP), or `act(up)` without a gate, recomputed in the backward pass.

    Why recompute: autodiff of the elementwise chain keeps its intermediates (for silu: sigmoid(gate),
    act(gate) and their products) as residuals, [tokens, d_ff] each, the widest activations of a
    layer. Under `jax.checkpoint` only the inputs are kept and the cheap elementwise part runs again
    in the backward pass: with the down projection's input, three d_ff-wide tensors per layer
    instead of six (SmolLM2-135M's shape, 1024 tokens: the float32 step's temp memory 3.0 -> 2.5 GiB
    at the same step time on CPU; benchmarks/RESULTS.md). The values are unchanged.
    """
    if gate is None:
        return jax.checkpoint(act)(up)
    return jax.checkpoint(lambda g, u: act(g) * u)(gate, up)


class Block(nnx.Module):
    """Residual block: x + attn(norm(x)), then x + mlp(norm(x)) ("pre", Llama).

    `block_norms="sandwich"` (Gemma 2/3) also normalises each branch's output before the residual
    sum: x + post_norm(attn(norm(x))); "post" (OLMo 2) normalises only the outputs:
    x + post_norm(attn(x)).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        pre, post = cfg.block_norms in ("pre", "sandwich"), cfg.block_norms in ("sandwich", "post")
        self.attn_norm = Norm(cfg, rngs) if pre else None
        self.attn = Attention(cfg, rngs)
        self.post_attn_norm = Norm(cfg, rngs) if post else None
        self.mlp_norm = Norm(cfg, rngs) if pre else None
        self.mlp = MLP(cfg, rngs)
        self.post_mlp_norm = Norm(cfg, rngs) if post else None

    def __call__(self, x, rope, mask, cache: LayerCache | None = None, cache_index=None, causal: bool = False):
        h, cache = self.attn(_maybe(self.attn_norm, x), rope, mask, cache, cache_index, causal)
        x = sharding.constrain(x + _maybe(self.post_attn_norm, h), ("batch", "length", "act_embed"))
        x = x + _maybe(self.post_mlp_norm, self.mlp(_maybe(self.mlp_norm, x)))
        return sharding.constrain(x, ("batch", "length", "act_embed")), cache


def gathered_table(table: jax.Array, dtype, rows: str) -> jax.Array:
    """A lookup table [rows, embed] in the compute dtype, gathered over its `embed` sharding.

    Why: the table's embed dimension is FSDP-sharded while the looked-up activations are sharded
    by batch over the same mesh axis; GSPMD cannot move the gather's output between the two
    layouts and falls back to replicating it ("[SPMD] Involuntary full rematerialization"). Cast
    first while still sharded (the gather then moves the narrow copy), then gather the embed
    dimension; only the row dimension (vocab over `tensor`) stays sharded, which GSPMD's lookup
    handles with a masked local lookup and one all-reduce.
    """
    return sharding.constrain(sharding.cast_sharded(table, dtype, (rows, "embed")), (rows, None))


def _maybe(norm: Norm | None, x: jax.Array) -> jax.Array:
    return x if norm is None else norm(x)


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
    unchanged. `cfg.scanned` chooses the layout of the blocks' parameters (module docstring); the
    function computed is the same.
    """

    def __init__(self, cfg: ModelConfig, *, rngs: nnx.Rngs, heads: tuple[str, ...] = ()):
        unknown = sorted(set(heads) - set(SCALAR_HEADS))
        if unknown:
            raise ValueError(f"Transformer: unknown head(s) {unknown}; the decoder carries {SCALAR_HEADS}")
        # A built model's config says its layout: `scan_layers=None` resolves by depth, dtype and
        # backend, so `model.cfg.replace(dtype=...)` must not flip it for the model's own weights.
        cfg = cfg if cfg.scan_layers is not None else cfg.replace(scan_layers=cfg.scanned)
        self.cfg = cfg
        init = nnx.initializers.normal(cfg.init_std)
        self.embed = _param(rngs, init, (cfg.vocab_size, cfg.d_model), ("vocab", "embed"), cfg)
        if cfg.position == "learned":
            self.pos_embed = _param(rngs, init, (cfg.max_positions, cfg.d_model), ("positions", "embed"), cfg)
        else:
            self.pos_embed = None
        self.kinds = layer_kinds(cfg)
        blocks = [Block(cfg, rngs) for _ in range(cfg.n_layers)]
        self.layers = layer_stack.stack_modules(blocks) if cfg.scanned else nnx.List(blocks)
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
        masks = self.attention_masks(segment_ids, prefix_mask)
        causal = prefix_mask is None  # then no query sees a later key (see attention_mask)
        logits, _ = self.forward(input_tokens, positions, masks, causal=causal)
        return logits

    def attention_masks(self, segment_ids: jax.Array, prefix_mask: jax.Array | None = None) -> dict[LayerKind, jax.Array]:
        """The attention mask of each kind of layer this model has (see `attention_mask`)."""
        return {kind: attention_mask(segment_ids, prefix_mask, kind.sliding_window) for kind in dict.fromkeys(self.kinds)}

    def hidden_states(
        self,
        input_tokens: jax.Array,
        *,
        positions: jax.Array,
        segment_ids: jax.Array,
        prefix_mask: jax.Array | None = None,
    ) -> tuple[jax.Array, jax.Array]:
        """(final-norm hidden states [B, L, d_model], output head [d_model, vocab]), compute dtype.

        `hidden @ head` are `__call__`'s logits, except for a model that soft-caps its logits
        (`cfg.final_softcap`, Gemma 2), which callers must then take from `__call__`. The trainer
        takes these two instead of the logits so its loss can own the head matmul's backward pass
        (losses.head_cross_entropy).
        """
        masks = self.attention_masks(segment_ids, prefix_mask)
        x, _ = self._features(input_tokens, positions, masks, None, None, prefix_mask is None)
        return x, self._head()

    def forward(
        self,
        tokens: jax.Array,
        positions: jax.Array,
        mask: jax.Array | Mapping[LayerKind, jax.Array],
        cache: Cache | None = None,
        cache_index: jax.Array | int | None = None,
        *,
        causal: bool = False,
        last_position_only: bool = False,
    ) -> tuple[jax.Array, Cache | None]:
        """The model with an explicit attention mask [B, 1, L, S] and optional KV cache.

        `mask` is one mask for every layer, or one per `LayerKind` of the model (a mapping).

        `causal=True` promises that `mask` lets no query see a later key, so attention may skip
        those blocks (`causal_block_attention`).

        `last_position_only=True` returns logits [B, 1, vocab] for the last position alone: a
        prefill needs no others, and the head over every prompt position is a large share of it.
        """
        x, new_cache = self._features(tokens, positions, mask, cache, cache_index, causal)
        if last_position_only:
            x = x[:, -1:]
        logits = jnp.dot(x, self._head(), preferred_element_type=jnp.float32)
        if self.cfg.final_softcap:  # Gemma 2: logits -> cap * tanh(logits / cap), in float32
            logits = self.cfg.final_softcap * jnp.tanh(logits / self.cfg.final_softcap)
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
        dtype = jnp.dtype(self.cfg.dtype)
        if self.lm_head is None:
            return sharding.cast_sharded(self.embed[...], dtype, ("vocab", "embed")).T
        return sharding.cast_sharded(self.lm_head[...], dtype, ("embed", "vocab"))

    def _features(self, tokens, positions, mask, cache, cache_index, causal: bool):
        """Embedding, blocks and final norm: the hidden states the head is applied to."""
        cfg = self.cfg
        dtype = jnp.dtype(cfg.dtype)
        x = jnp.take(gathered_table(self.embed[...], dtype, "vocab"), tokens, axis=0)
        if cfg.embed_scale:
            x = x * jnp.asarray(cfg.embed_multiplier, dtype)
        if self.pos_embed is not None:
            x = x + jnp.take(gathered_table(self.pos_embed[...], dtype, "positions"), positions, axis=0)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        # One rope table per rope a kind of layer uses (Gemma 3: local and global bases).
        ropes = ({local: rope_angles(positions, cfg, local) for local in dict.fromkeys(k.local_rope for k in self.kinds)}
                 if cfg.position == "rope" else {})
        mask_of = (lambda kind: mask[kind]) if isinstance(mask, Mapping) else (lambda kind: mask)  # noqa: E731
        run_block = _run_causal_block if causal else _run_block

        if cfg.scanned:
            def body(block, x, stacked_cache, index, kind):
                layer_cache = None if stacked_cache is None else (*stacked_cache, index)
                x, layer_cache = run_block(block, x, ropes.get(kind.local_rope), mask_of(kind), layer_cache, cache_index)
                return x, None if layer_cache is None else layer_cache[:2]

            x, new_cache = layer_stack.run_stacked(
                self.layers, self.kinds, body, x, cache, remat=cfg.remat != "none", policy=_REMAT_POLICIES.get(cfg.remat)
            )
            return self.final_norm(x), new_cache

        if cfg.remat != "none":
            run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[cfg.remat], prevent_cse=True)
        new_cache = [] if cache is not None else None
        for i, (block, kind) in enumerate(zip(self.layers, self.kinds)):
            x, layer_cache = run_block(block, x, ropes.get(kind.local_rope), mask_of(kind),
                                       None if cache is None else cache[i], cache_index)
            if new_cache is not None:
                new_cache.append(layer_cache)

        return self.final_norm(x), new_cache

    def init_cache(self, batch: int, length: int) -> Cache:
        """Zeroed KV cache for `batch` rows of `length` tokens, in the compute dtype.

        Unrolled: one (keys, values) per layer; scanned: (keys, values) with a leading layer axis.
        """
        cfg = self.cfg
        shape = (batch, cfg.n_kv_heads, length, cfg.head_dim)
        dtype = jnp.dtype(cfg.dtype)
        if cfg.scanned:
            return (jnp.zeros((cfg.n_layers, *shape), dtype), jnp.zeros((cfg.n_layers, *shape), dtype))
        return [(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype)) for _ in range(cfg.n_layers)]


def logical_axes(model: nnx.Module) -> Any:
    """Like `nnx.state(model, nnx.Param)`, with each parameter replaced by its logical axis names."""
    state = nnx.state(model, nnx.Param)
    return jax.tree.map(lambda v: v.logical_axes, state, is_leaf=lambda x: isinstance(x, nnx.Variable))
