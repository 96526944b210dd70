"""Autoregressive decoding with a KV cache, jitted once per shape bucket.

    from flan_jax.model.generate import generate
    new_tokens = generate(model, [[5, 6, 7], [8, 9]], max_new_tokens=32, eos_id=2)

How a batch of prompts of different lengths is laid out: prompts are LEFT-padded to a common
length P, so every row writes the same cache slot at each step (a plain dynamic_update_slice).
Padding gets segment id 0 and is masked out of every key set; positions restart at 0 on each
row's first real token, so a row decodes exactly as it would alone.

Every family decodes through here (`generate_arrays` dispatches to the family's loop, see
model.registry): the decoder below, T5 in t5_generate.py (the encoder runs once on the prompts, the
decoder caches its own keys and values), with the same prompt layout and shape buckets.

Compilation: the prompt length is rounded up to a power of two or 1.5x one (at least 8), the batch to a
power of two (dummy rows start finished and are dropped from the output) and `max_new_tokens` to a power of two
(the loop stops at the real limit, or earlier when every row has produced EOS). One compiled
program therefore serves every batch of an evaluation run with similar lengths. Sampling
settings that change the program (greedy or not, top-k, whether top-p is on) are static;
temperature and top-p values are not.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flan_jax.model.transformer import Transformer, attention_mask


@dataclasses.dataclass
class Generation:
    """Raw decoding output for the real rows of a batch.

    tokens: [batch, steps] int32 (pad_id after EOS); lengths: new tokens before EOS per row;
    logits: [batch, steps, vocab] float32, the distribution each token was chosen from
    (only with return_logits=True).
    """

    tokens: np.ndarray
    lengths: np.ndarray
    logits: np.ndarray | None = None
    steps_run: int = 0  # decoding steps executed (stops early once every row has ended)

    def as_lists(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths)]


def generate(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    prefix_lm: bool = False,
) -> list[list[int]]:
    """New tokens for each prompt (EOS excluded). temperature 0 = greedy.

    prefix_lm=True: the prompt tokens attend to each other bidirectionally, as in training with
    `config.data.prefix_lm` (the prompt is the instruction part).
    """
    return generate_arrays(
        model, prompts, max_new_tokens=max_new_tokens, eos_id=eos_id, pad_id=pad_id,
        temperature=temperature, top_k=top_k, top_p=top_p, rng=rng, prefix_lm=prefix_lm,
    ).as_lists()


def generate_arrays(
    model: nnx.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_id: int,
    pad_id: int = 0,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    rng: jax.Array | None = None,
    prefix_lm: bool = False,
    return_logits: bool = False,
) -> Generation:
    """Like `generate`, returning arrays (and optionally the per-step logits, for tests).

    The prompt layout, checks and shape buckets are shared; the decoding loop is the model
    family's (model.registry `Family.generate`: the decoder's `decode` below, T5's in t5_generate.py).
    """
    from flan_jax.model import registry

    if not prompts:
        return Generation(np.zeros((0, max_new_tokens), np.int32), np.zeros((0,), np.int32))
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    for i, prompt in enumerate(prompts):
        if len(prompt) == 0:
            raise ValueError(f"prompt {i} is empty: decoding needs at least one token (e.g. BOS)")
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"bad sampling settings temperature={temperature}, top_k={top_k}, top_p={top_p}")
    request = DecodeRequest(
        left_padded(prompts, pad_id), max_new_tokens, eos_id, pad_id, temperature, top_k, top_p,
        jax.random.key(0) if rng is None else rng, prefix_lm, return_logits,
    )
    out_tokens, out_logits, steps_run = registry.family_of(model).generate(model, request)
    out_tokens = np.asarray(out_tokens)[: len(prompts), :max_new_tokens]
    is_eos = out_tokens == eos_id
    lengths = np.where(is_eos.any(axis=1), is_eos.argmax(axis=1), max_new_tokens).astype(np.int32)
    logits = None if out_logits is None else np.asarray(out_logits)[: len(prompts), :max_new_tokens]
    return Generation(out_tokens, lengths, logits, int(steps_run))


@dataclasses.dataclass(frozen=True)
class PromptBatch:
    """Prompts left-padded into one bucketed batch: row r's prompt ends at column P - 1.

    tokens / segments (1 on prompt tokens, 0 on padding) / positions (restarting at 0 on the first
    real token) are [batch, P]; rows past the real prompts are dummies that start finished.
    """

    tokens: np.ndarray
    segments: np.ndarray
    positions: np.ndarray
    num_prompts: int
    longest: int


def left_padded(prompts: Sequence[Sequence[int]], pad_id: int) -> PromptBatch:
    """The bucketed, left-padded layout of `prompts` (see PromptBatch and the module docstring)."""
    longest = max(len(p) for p in prompts)
    batch = _bucket(len(prompts), minimum=1)
    prompt_len = _prompt_bucket(longest)
    tokens = np.full((batch, prompt_len), pad_id, np.int32)
    segments = np.zeros((batch, prompt_len), np.int32)
    positions = np.zeros((batch, prompt_len), np.int32)
    for row in range(batch):
        prompt = prompts[row] if row < len(prompts) else [pad_id]  # dummy rows decode a pad token
        n = len(prompt)
        tokens[row, prompt_len - n:] = prompt
        segments[row, prompt_len - n:] = 1
        positions[row, prompt_len - n:] = np.arange(n)
    return PromptBatch(tokens, segments, positions, len(prompts), longest)


@dataclasses.dataclass(frozen=True)
class DecodeRequest:
    """What a family's decoding loop gets: the laid-out prompts and the sampling settings.

    `static` are the settings that change the compiled program, `arrays` the traced ones.
    """

    prompts: PromptBatch
    max_new_tokens: int
    eos_id: int
    pad_id: int
    temperature: float
    top_k: int
    top_p: float
    rng: jax.Array
    prefix_lm: bool
    return_logits: bool

    def arrays(self) -> dict[str, jax.Array]:
        p = self.prompts
        return dict(
            tokens=jnp.asarray(p.tokens), positions=jnp.asarray(p.positions), segments=jnp.asarray(p.segments),
            finished=jnp.arange(p.tokens.shape[0]) >= p.num_prompts,  # dummy rows never prolong the loop
            max_new=jnp.int32(self.max_new_tokens), eos_id=jnp.int32(self.eos_id), pad_id=jnp.int32(self.pad_id),
            temperature=jnp.float32(max(self.temperature, 1e-6)), top_p=jnp.float32(self.top_p), rng=self.rng,
        )

    def static(self, vocab_size: int) -> dict[str, object]:
        return dict(
            steps=_bucket(self.max_new_tokens, minimum=1), greedy=self.temperature == 0.0,
            top_k=min(self.top_k, vocab_size), use_top_p=self.top_p < 1.0, return_logits=self.return_logits,
        )


def decode(model: Transformer, request: DecodeRequest):
    """The decoder family's loop: prefill the prompts, then decode with the KV cache."""
    cfg = model.cfg
    if cfg.position == "learned" and request.prompts.longest + request.max_new_tokens > cfg.max_positions:
        raise ValueError(
            f"prompt ({request.prompts.longest}) + max_new_tokens ({request.max_new_tokens}) exceeds the model's "
            f"{cfg.max_positions} learned positions"
        )
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, **request.arrays(), **request.static(cfg.vocab_size), prefix_lm=request.prefix_lm)


def _bucket(n: int, minimum: int) -> int:
    """Smallest power of two >= max(n, minimum)."""
    return max(minimum, 1 << max(0, (n - 1).bit_length()))


def _prompt_bucket(n: int) -> int:
    """Smallest of 8, 12, 16, 24, 32, 48, ... (powers of two and 1.5x them) >= n.

    The prompt bucket sets the prefill's work and the cache every decoding step reads, so it is
    finer than a power of two: at most a third of it is padding (a 65-token prompt gets 96, not
    128), for at most twice the compiled programs.
    """
    power = _bucket(n, minimum=8)
    three_quarters = 3 * power // 4
    return three_quarters if three_quarters >= max(n, 8) and power >= 16 else power


def sample(logits: jax.Array, rng: jax.Array, temperature, top_p, *, greedy: bool, top_k: int, use_top_p: bool):
    """One token per row from [B, V] float32 logits: argmax, or temperature / top-k / top-p sampling.

    Written for the decoding loop's per-step cost, which on CPU these choices dominate for small
    models: one uniform per row and an inverse-CDF search (not `jax.random.categorical`'s V Gumbel
    draws per row, ~20x slower), the nucleus found by bisection on the logits (not by sorting, which
    with indices is ~40x slower again), and the argmax as a max and a min (a single-operand
    reduction vectorises; the (value, index) one does not).
    """
    if greedy:
        return first_argmax(logits)
    logits = logits / temperature
    if top_k:
        kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))  # unnormalised probabilities
    if use_top_p:
        keep = nucleus(logits, weights / jnp.sum(weights, axis=-1, keepdims=True), top_p)
        weights = jnp.where(keep, weights, 0.0)
    uniform = 1.0 - jax.random.uniform(rng, (logits.shape[0], 1))  # in (0, 1]: never picks a zero weight
    return inverse_cdf(weights, uniform)


def first_argmax(x: jax.Array) -> jax.Array:
    """`jnp.argmax(x, -1)` (the first maximum's index) as two single-operand reductions."""
    top = jnp.max(x, axis=-1, keepdims=True)
    index = jnp.min(jnp.where(x == top, jnp.arange(x.shape[-1]), x.shape[-1]), axis=-1)
    return jnp.minimum(index, x.shape[-1] - 1).astype(jnp.int32)  # a row of NaNs gives the last index


_CDF_BLOCK = 128


def inverse_cdf(weights: jax.Array, uniform: jax.Array) -> jax.Array:
    """Index drawn per row with probability weights / sum(weights): the first index whose running
    sum reaches uniform * sum ([B, V] weights >= 0, [B, 1] uniform in (0, 1]).

    The running sum is taken in two levels (per block of 128, then inside the chosen block), which
    avoids a full-width cumulative sum: XLA:CPU's is several times slower than the rest together.
    """
    rows, vocab = weights.shape
    blocks = -(-vocab // _CDF_BLOCK)
    blocked = jnp.pad(weights, ((0, 0), (0, blocks * _CDF_BLOCK - vocab))).reshape(rows, blocks, _CDF_BLOCK)
    block_mass = jnp.sum(blocked, axis=-1)
    block_cdf = jnp.cumsum(block_mass, axis=-1)
    target = uniform * block_cdf[:, -1:]
    block = jnp.minimum(jnp.sum(block_cdf < target, axis=-1), blocks - 1)[:, None]
    mass_before = jnp.take_along_axis(block_cdf - block_mass, block, axis=-1)
    inner_cdf = mass_before + jnp.cumsum(jnp.take_along_axis(blocked, block[:, :, None], axis=1)[:, 0], axis=-1)
    inner = jnp.minimum(jnp.sum(inner_cdf < target, axis=-1), _CDF_BLOCK - 1)
    return jnp.minimum(block[:, 0] * _CDF_BLOCK + inner, vocab - 1).astype(jnp.int32)


def nucleus(logits: jax.Array, probs: jax.Array, top_p) -> jax.Array:
    """[B, V] bool: the top-p nucleus, i.e. every token whose strictly more likely tokens hold less
    than `top_p` of the mass (the most likely token always; tied tokens are kept or dropped together).

    The cutoff is found by bisection over the logits' float32 bit patterns (32 halvings of the
    int32 range make it exact): each halving is one masked sum over the row, instead of a sort.
    """
    key = _ordered_int(logits)
    low = jnp.min(key, axis=-1, keepdims=True) - 1  # mass above it: all of it (>= top_p)
    high = jnp.max(key, axis=-1, keepdims=True)  # mass above it: none (< top_p)

    def halve(_, bounds):
        low, high = bounds
        mid = (low & high) + ((low ^ high) >> 1)  # floor((low + high) / 2) without int32 overflow
        below_p = jnp.sum(jnp.where(key > mid, probs, 0.0), axis=-1, keepdims=True) < top_p
        return jnp.where(below_p, low, mid), jnp.where(below_p, mid, high)

    _, cutoff = jax.lax.fori_loop(0, 32, halve, (low, high))
    return key >= cutoff


def _ordered_int(x: jax.Array) -> jax.Array:
    """int32 keys with the order of the float32 values (-inf lowest), for exact bisection."""
    bits = jax.lax.bitcast_convert_type(x.astype(jnp.float32), jnp.int32)
    return jnp.where(bits < 0, bits ^ jnp.int32(0x7FFFFFFF), bits)


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "greedy", "top_k", "use_top_p", "prefix_lm", "return_logits"))
def _decode(
    graphdef, state, *, tokens, positions, segments, finished, max_new, eos_id, pad_id, temperature, top_p, rng,
    steps: int, greedy: bool, top_k: int, use_top_p: bool, prefix_lm: bool, return_logits: bool,
):
    model = nnx.merge(graphdef, state)
    batch, prompt_len = tokens.shape
    cache_len = prompt_len + steps
    slots = jnp.arange(cache_len)

    # Prefill: the whole (left-padded) prompt in one pass, keys/values into slots [0, P).
    # One mask per kind of layer (e.g. sliding-window and full ones).
    kinds = tuple(dict.fromkeys(model.kinds))
    prompt_masks = {
        kind: jnp.pad(attention_mask(segments, segments if prefix_lm else None, kind.sliding_window),
                      ((0, 0), (0, 0), (0, 0), (0, steps)))
        for kind in kinds
    }
    logits, cache = model.forward(tokens, positions, prompt_masks, model.init_cache(batch, cache_len), 0,
                                  last_position_only=True)  # prompts are left-padded: all end at P - 1
    key_valid = jnp.concatenate([segments > 0, jnp.ones((batch, steps), bool)], axis=1)

    vocab = logits.shape[-1]
    carry = dict(
        step=jnp.int32(0),
        logits=logits[:, -1],
        cache=cache,
        position=positions[:, -1] + 1,
        done=finished,
        tokens=jnp.full((batch, steps), pad_id, jnp.int32),
        all_logits=jnp.zeros((batch, steps, vocab), jnp.float32) if return_logits else None,
        rng=rng,
    )

    def keep_going(c):
        return (c["step"] < max_new) & ~jnp.all(c["done"])

    def one_step(c):
        rng, key = jax.random.split(c["rng"])
        token = sample(c["logits"], key, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        token = jnp.where(c["done"], pad_id, token)
        out = dict(c, rng=rng, done=c["done"] | (token == eos_id))
        out["tokens"] = c["tokens"].at[:, c["step"]].set(token)
        if return_logits:
            out["all_logits"] = c["all_logits"].at[:, c["step"]].set(c["logits"])
        # Feed the token back: it sits in cache slot P + step and sees every valid earlier slot.
        slot = prompt_len + c["step"]
        visible = key_valid & (slots <= slot)
        masks = {
            kind: (visible & (slots > slot - kind.sliding_window) if kind.sliding_window else visible)[:, None, None, :]
            for kind in kinds
        }
        logits, out["cache"] = model.forward(token[:, None], c["position"][:, None], masks, c["cache"], slot)
        out["logits"] = logits[:, -1]
        out["position"] = c["position"] + 1
        out["step"] = c["step"] + 1
        return out

    final = jax.lax.while_loop(keep_going, one_step, carry)
    return final["tokens"], final["all_logits"], final["step"]
