"""T5 decoding: the encoder runs once over the prompts, the decoder with a KV cache.

`flan_jax.model.generate.generate(model, prompts, ...)` lands here for a T5 model (the registry
dispatches by family), with generate.py's contract: prompts are the encoder inputs (T5 prompts end
with EOS: `converters.ENCDEC.prompt_ids`), the new tokens come back without EOS, greedy or sampled
(temperature / top-k / top-p), and batch, prompt length and `max_new_tokens` are bucketed to powers
of two so one compiled program serves a whole evaluation.

Per call: the left-padded prompts (generate.left_padded: padding is segment 0 and never read) go
through the encoder once; each decoder layer's cross-attention keys and values of that output are
projected once; then the decoder starts from PAD (T5's decoder start token) and feeds each chosen
token back, its self-attention reading the cached keys/values of the earlier steps (with the causal
relative position bias of their distance) and its cross-attention the precomputed encoder ones.
"""

from __future__ import annotations

import functools
import jax
import jax.numpy as jnp
from flax import nnx

from flan_jax.model import generate as generate_lib


def decode(model: nnx.Module, request: generate_lib.DecodeRequest):
    """T5's loop for `generate.generate_arrays` (`prefix_lm` changes nothing: the encoder is bidirectional)."""
    graphdef, state = nnx.split(model)
    return _decode(graphdef, state, **request.arrays(), **request.static(model.cfg.vocab_size))


@functools.partial(jax.jit, static_argnames=("graphdef", "steps", "greedy", "top_k", "use_top_p", "return_logits"))
def _decode(
    graphdef, state, *, tokens, positions, segments, finished, max_new, eos_id, pad_id, temperature, top_p, rng,
    steps: int, greedy: bool, top_k: int, use_top_p: bool, return_logits: bool,
):
    model = nnx.merge(graphdef, state)
    batch = tokens.shape[0]
    encoded = model.encode(tokens, positions, segments)
    cross_kv = model.cross_keys_values(encoded)
    cross_mask = (segments > 0)[:, None, None, :]
    # Slot 0 holds the decoder start token; the token chosen at step s is fed into slot s + 1.
    cache = model.init_cache(batch, steps + 1)
    start = jnp.full((batch, 1), pad_id, jnp.int32)
    logits, cache = model.decode_step(start, jnp.int32(0), cache, cross_kv, cross_mask)

    carry = dict(
        step=jnp.int32(0),
        logits=logits,
        cache=cache,
        done=finished,
        tokens=jnp.full((batch, steps), pad_id, jnp.int32),
        all_logits=jnp.zeros((batch, steps, logits.shape[-1]), jnp.float32) if return_logits else None,
        rng=rng,
    )

    def keep_going(c):
        return (c["step"] < max_new) & ~jnp.all(c["done"])

    def one_step(c):
        rng, key = jax.random.split(c["rng"])
        token = generate_lib.sample(c["logits"], key, temperature, top_p, greedy=greedy, top_k=top_k, use_top_p=use_top_p)
        token = jnp.where(c["done"], pad_id, token)
        out = dict(c, rng=rng, done=c["done"] | (token == eos_id))
        out["tokens"] = c["tokens"].at[:, c["step"]].set(token)
        if return_logits:
            out["all_logits"] = c["all_logits"].at[:, c["step"]].set(c["logits"])
        out["logits"], out["cache"] = model.decode_step(token[:, None], c["step"] + 1, c["cache"], cross_kv, cross_mask)
        out["step"] = c["step"] + 1
        return out

    final = jax.lax.while_loop(keep_going, one_step, carry)
    return final["tokens"], final["all_logits"], final["step"]
