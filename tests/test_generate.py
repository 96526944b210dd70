"""KV-cache decoding: equals recomputing the full forward pass, batching, EOS, sampling, buckets."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from flan_jax import model as fm
from flan_jax.model import generate as gen

TINY = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=48, max_positions=64)
PROMPTS = [[5, 9, 3, 17, 22], [7, 1], [30, 31, 32, 33, 34, 35, 36, 37, 38, 39, 40]]


def make(family: str = "llama", **overrides) -> fm.Transformer:
    # Larger init so that greedy continuations vary instead of repeating one token.
    cfg = fm.ModelConfig.for_family(family, **{**TINY, "init_std": 0.5, "attention": "xla", **overrides})
    return fm.Transformer(cfg, rngs=nnx.Rngs(1))


def full_forward_logits(model, prompts: list[list[int]], new_tokens: np.ndarray, prefix_lm: bool = False) -> np.ndarray:
    """Logits that chose each new token, from the plain forward pass over prompt + new tokens.

    No cache: by causality, position len(prompt) - 1 + t of the full sequence sees exactly what
    step t of decoding saw. Rows are right-padded (segment 0) into one batch.
    """
    steps = new_tokens.shape[1]
    seqs = [list(p) + new_tokens[r, :-1].tolist() for r, p in enumerate(prompts)]
    length = max(len(s) for s in seqs)
    tokens = np.zeros((len(seqs), length), np.int32)
    segments = np.zeros_like(tokens)
    for r, seq in enumerate(seqs):
        tokens[r, : len(seq)], segments[r, : len(seq)] = seq, 1
    positions = np.broadcast_to(np.arange(length, dtype=np.int32), tokens.shape)
    prefix = np.zeros_like(tokens)
    for r, p in enumerate(prompts):
        prefix[r, : len(p)] = prefix_lm
    logits = nnx.jit(lambda m, t, p, s, x: m(t, positions=p, segment_ids=s, prefix_mask=x))(
        model, tokens, positions, segments, prefix)
    return np.stack([np.asarray(logits[r, len(p) - 1: len(p) - 1 + steps]) for r, p in enumerate(prompts)])


@pytest.mark.parametrize("family,overrides,prefix_lm", [
    ("llama", {}, False), ("gpt2", {}, False), ("mistral", {"sliding_window": 4}, False), ("gemma", {}, True),
    # Per-layer kinds: sliding and full layers, and Gemma 3's local rope base on the sliding ones.
    ("gemma2", {"sliding_window": 3, "layer_types": ("sliding", "full"), "query_scale": 12.0}, False),
    ("gemma3", {"sliding_window": 3, "layer_types": ("sliding", "full"), "local_rope_theta": 100.0}, False),
])
def test_cached_greedy_equals_full_recompute(family, overrides, prefix_lm):
    model = make(family, **overrides)
    out = gen.generate_arrays(model, PROMPTS, max_new_tokens=6, eos_id=-1, return_logits=True, prefix_lm=prefix_lm)
    assert out.tokens.shape == (3, 6) and (out.lengths == 6).all()
    assert len({tuple(r) for r in out.tokens.tolist()}) > 1
    expected = full_forward_logits(model, PROMPTS, out.tokens, prefix_lm)
    if prefix_lm:  # the prefix mask matters: causal decoding would give other logits
        causal = full_forward_logits(model, PROMPTS, out.tokens)
        assert np.abs(causal - expected).max() > 1e-3
    np.testing.assert_allclose(out.logits, expected, atol=1e-4, rtol=1e-4)
    np.testing.assert_array_equal(out.tokens, expected.argmax(-1))


def test_batch_of_different_lengths_equals_one_by_one():
    model = make()
    batched = gen.generate(model, PROMPTS, max_new_tokens=5, eos_id=-1)
    for prompt, got in zip(PROMPTS, batched):
        assert gen.generate(model, [prompt], max_new_tokens=5, eos_id=-1) == [got]


def test_stops_at_eos_and_excludes_it():
    model = make()
    free = gen.generate(model, PROMPTS, max_new_tokens=6, eos_id=-1)
    eos = free[0][2]
    first = free[0].index(eos)  # greedy is deterministic, so the row stops here
    stopped = gen.generate_arrays(model, PROMPTS, max_new_tokens=6, eos_id=eos, pad_id=0)
    assert stopped.as_lists()[0] == free[0][:first]
    assert stopped.tokens[0, first] == eos and (stopped.tokens[0, first + 1:] == 0).all()
    for row in (1, 2):  # other rows stop only at their own EOS
        expected = free[row][: free[row].index(eos)] if eos in free[row] else free[row]
        assert stopped.as_lists()[row] == expected


def test_max_new_tokens_is_exact_not_the_bucket():
    model = make()
    out = gen.generate(model, PROMPTS, max_new_tokens=3, eos_id=-1)
    assert [len(r) for r in out] == [3, 3, 3]


def test_sampling_respects_top_k_and_top_p():
    model = make()
    rng = jax.random.key(7)
    sampled = gen.generate_arrays(
        model, PROMPTS, max_new_tokens=8, eos_id=-1, temperature=1.0, top_k=3, rng=rng, return_logits=True
    )
    top3 = np.argsort(-sampled.logits, axis=-1)[..., :3]
    assert all(sampled.tokens[r, t] in top3[r, t] for r in range(3) for t in range(8))
    again = gen.generate(model, PROMPTS, max_new_tokens=8, eos_id=-1, temperature=1.0, top_k=3, rng=rng)
    assert again == sampled.as_lists()  # same key, same tokens
    greedy = gen.generate(model, PROMPTS, max_new_tokens=8, eos_id=-1)
    assert greedy != sampled.as_lists()  # high temperature over 24 tokens: some differ
    tiny_p = gen.generate(model, PROMPTS, max_new_tokens=8, eos_id=-1, temperature=1.0, top_p=1e-4, rng=rng)
    assert tiny_p == greedy  # the nucleus is only the most likely token
    assert gen.generate(model, PROMPTS, max_new_tokens=8, eos_id=-1, temperature=5.0, top_k=1, rng=rng) == greedy


def test_sample_top_p_keeps_the_nucleus():
    logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]]))
    keys = jax.random.split(jax.random.key(0), 400)
    draws = np.asarray(jax.vmap(
        lambda k: gen.sample(logits, k, 1.0, 0.75, greedy=False, top_k=0, use_top_p=True)
    )(keys))
    assert set(draws.ravel().tolist()) == {0, 1}  # 0.5 + 0.3 reach 0.75; 0.15 and 0.05 never drawn


def test_inverse_cdf_draws_each_token_with_its_probability():
    # 300 tokens: not a multiple of the 128-wide blocks; some weights zero, one block all zero.
    weights = np.random.default_rng(0).gamma(0.5, size=(1, 300)).astype(np.float32)
    weights[0, ::7] = 0.0
    weights[0, 128:256] = 0.0
    draws = 200_000
    uniform = 1.0 - jax.random.uniform(jax.random.key(0), (draws, 1))
    picked = np.asarray(jax.jit(gen.inverse_cdf)(jnp.broadcast_to(jnp.asarray(weights), (draws, 300)), uniform))
    freq = np.bincount(picked, minlength=300) / draws
    probs = weights[0] / weights.sum()
    assert (freq[probs == 0] == 0).all()  # a zero weight is never drawn
    tolerance = 5 * np.sqrt(probs * (1 - probs) / draws) + 1e-12  # five binomial standard deviations
    assert (np.abs(freq - probs) <= tolerance).all(), np.abs(freq - probs).max()
    assert np.asarray(gen.inverse_cdf(jnp.asarray(weights), jnp.ones((1, 1))))[0] == np.flatnonzero(weights[0])[-1]


def test_nucleus_is_the_sorted_definition():
    logits = jax.random.normal(jax.random.key(3), (64, 1000)) * 2
    probs = np.asarray(jax.nn.softmax(logits, axis=-1), np.float64)
    for top_p in (0.1, 0.5, 0.9):
        kept = np.asarray(gen.nucleus(logits, jnp.asarray(probs, jnp.float32), top_p))
        order = np.argsort(-probs, axis=-1)
        sorted_probs = np.take_along_axis(probs, order, -1)
        mass_before = np.cumsum(sorted_probs, -1) - sorted_probs
        clear = np.abs(mass_before - top_p).min(-1) > 1e-5  # rows whose cutoff is not a float rounding call
        expected = np.zeros_like(kept)
        np.put_along_axis(expected, order, mass_before < top_p, -1)
        assert clear.sum() > 50
        np.testing.assert_array_equal(kept[clear], expected[clear])
    ties = jnp.asarray([[1.0, 3.0, 3.0, 0.0]])
    kept = np.asarray(gen.nucleus(ties, jax.nn.softmax(ties, -1), 0.3))
    assert kept.tolist() == [[False, True, True, False]]  # tied tokens are kept together


def test_first_argmax_is_argmax_with_ties():
    x = jnp.asarray(np.random.default_rng(1).integers(0, 4, (50, 37)).astype(np.float32))
    np.testing.assert_array_equal(gen.first_argmax(x), jnp.argmax(x, axis=-1))


def test_prompt_buckets_waste_at_most_a_third():
    for n in range(1, 600):
        bucket = gen._prompt_bucket(n)
        assert bucket >= max(n, 8) and (bucket <= 8 or (bucket - n) / bucket < 1 / 3 + 1e-9)
    assert [gen._prompt_bucket(n) for n in (8, 9, 13, 65, 97)] == [8, 12, 16, 96, 128]


def test_one_compilation_per_bucket():
    model = make()
    gen.generate(model, [[1, 2, 3]], max_new_tokens=4, eos_id=-1)
    size = gen._decode._cache_size()
    gen.generate(model, [[4, 5, 6, 7, 8], [9]], max_new_tokens=3, eos_id=-1)  # same buckets: 8 / 2 -> ...
    gen.generate(model, [[4, 5, 6, 7, 8]], max_new_tokens=4, eos_id=-1)
    assert gen._decode._cache_size() == size + 1  # only the batch-of-2 bucket was new


def test_bad_requests_are_refused():
    model = make()
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        gen.generate(model, [[1], []], max_new_tokens=2, eos_id=2)
    with pytest.raises(ValueError, match="learned positions"):
        gen.generate(make("gpt2"), [[1] * 60], max_new_tokens=10, eos_id=2)


def test_dummy_rows_of_the_batch_bucket_do_not_prolong_decoding():
    model = make()
    eos = gen.generate(model, [PROMPTS[0]], max_new_tokens=1, eos_id=-1)[0][0]
    # 3 prompts -> a bucket of 4 rows; the row stops at once, and so must the whole batch.
    out = gen.generate_arrays(model, [PROMPTS[0]] * 3, max_new_tokens=8, eos_id=eos, pad_id=0)
    assert (out.lengths == 0).all() and (out.tokens[:, 1:] == 0).all()
    assert out.steps_run == 1
    assert gen.generate_arrays(model, [PROMPTS[0]] * 3, max_new_tokens=8, eos_id=-1).steps_run == 8
