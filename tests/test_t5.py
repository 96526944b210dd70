"""The T5 family against transformers on tiny random models: logits (with and without packing),
relative position buckets, greedy generation, and the pieces generation relies on."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from flan_jax.model import generate as generate_lib  # noqa: E402
from flan_jax.model import registry, t5  # noqa: E402
from flan_jax.model.t5_config import T5Config  # noqa: E402
from tests import t5_fakes  # noqa: E402

VARIANTS = ("flan_t5", "v11_tied", "t5_original", "mt5")
TOL = dict(atol=1e-4, rtol=1e-4)


@pytest.fixture(scope="module")
def pairs():
    """{variant: (hf model, our cfg, our model)} with the same weights."""
    out = {}
    for name in VARIANTS:
        hf = t5_fakes.build_hf(name)
        cfg, ours = t5_fakes.ours_from_hf(hf)
        out[name] = (hf, cfg, ours)
    return out


def test_variants_read_the_switches_transformers_uses(pairs):
    switches = {name: (cfg.gated_mlp, cfg.activation, cfg.tie_embeddings, cfg.scale_decoder_outputs) for name, (_, cfg, _) in pairs.items()}
    assert switches == {
        "flan_t5": (True, "gelu_tanh", False, False),
        "v11_tied": (True, "gelu_tanh", True, False),
        "t5_original": (False, "relu", True, True),
        "mt5": (True, "gelu_tanh", False, False),
    }
    for hf, cfg, ours in pairs.values():
        n_ours = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(nnx.state(ours, nnx.Param)))
        n_hf = sum(p.numel() for p in hf.parameters())  # transformers counts a tied weight once
        assert n_ours == cfg.num_params == n_hf


@pytest.mark.parametrize("name", VARIANTS)
def test_logits_match_transformers_unpacked_and_padded(pairs, name):
    hf, cfg, ours = pairs[name]
    vocab = cfg.vocab_size
    enc, dec = t5_fakes.random_ids((2, 11), 1, vocab), t5_fakes.random_ids((2, 7), 2, vocab)
    reference = t5_fakes.hf_logits(hf, enc, dec)
    np.testing.assert_allclose(t5_fakes.logits(ours, encoder_input_tokens=enc, decoder_input_tokens=dec), reference, **TOL)

    # Right padding of the encoder (HF's attention_mask) is segment 0 for us.
    mask = np.ones_like(enc)
    mask[1, 6:] = 0
    reference = t5_fakes.hf_logits(hf, enc * mask, dec, encoder_mask=mask)
    got = t5_fakes.logits(ours, encoder_input_tokens=enc * mask, decoder_input_tokens=dec, encoder_segment_ids=mask)
    np.testing.assert_allclose(got, reference, **TOL)


@pytest.mark.parametrize("name", ["flan_t5", "t5_original"])
def test_packed_examples_each_equal_transformers_alone(pairs, name):
    hf, cfg, ours = pairs[name]
    examples = [(t5_fakes.random_ids((n,), 10 + i), t5_fakes.random_ids((m,), 20 + i)) for i, (n, m) in enumerate([(5, 3), (9, 6), (4, 2)])]
    row = t5_fakes.packed_rows(examples, enc_len=21, dec_len=13)  # room left over: padding in both rows
    features = {k: row[k] for k in ("encoder_input_tokens", "encoder_positions", "encoder_segment_ids",
                                    "decoder_input_tokens", "decoder_positions", "decoder_segment_ids")}
    packed = t5_fakes.logits(ours, **features)
    start = 0
    for enc, dec in examples:
        alone = t5_fakes.hf_logits(hf, enc[None], dec[None])
        np.testing.assert_allclose(packed[:, start:start + len(dec)], alone, **TOL)
        start += len(dec)


def test_relative_position_buckets_equal_transformers():
    from transformers.models.t5.modeling_t5 import T5Attention

    relative = np.arange(-700, 700)
    for buckets, distance in [(32, 128), (8, 20), (16, 64)]:
        for bidirectional in (True, False):
            expected = T5Attention._relative_position_bucket(
                torch.as_tensor(relative), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            ).numpy()
            got = t5.relative_position_bucket(
                jnp.asarray(relative), bidirectional=bidirectional, num_buckets=buckets, max_distance=distance
            )
            np.testing.assert_array_equal(np.asarray(got), expected)


def test_fused_attention_call_equals_the_einsum_path():
    """The arguments `attention="cudnn"` gives jax.nn.dot_product_attention (bias, mask, scale 1)
    compute what the float32 einsum path does (checked with its XLA implementation on CPU)."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 5, 4, 8)), jnp.float32) for _ in range(3))
    bias = jnp.asarray(rng.normal(size=(1, 4, 5, 5)), jnp.float32)
    segments = jnp.asarray([[1, 1, 2, 2, 0], [1, 1, 1, 1, 1]])
    mask = t5.segment_mask(segments, segments, causal=True)
    cfg = T5Config(d_model=32, n_heads=4, head_dim=8)
    expected = t5.attend(q, k, v, bias, mask, cfg)
    got = t5.fused_attention(q, k, v, bias, mask, implementation="xla")
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


def test_cpu_and_xla_kernels_give_the_same_t5_loss_and_gradients(pairs):
    """T5's projections go through the decoder's matmul kernels (config.model.kernels): the CPU
    custom-gradient matmul and the plain XLA one agree on a loss of the logits and on every
    parameter gradient."""
    _, cfg, trained = pairs["flan_t5"]
    enc, dec = t5_fakes.random_ids((2, 9), 5), t5_fakes.random_ids((2, 5), 6)
    features = dict(encoder_input_tokens=jnp.asarray(enc), decoder_input_tokens=jnp.asarray(dec))

    @nnx.jit
    def loss_and_grads(model):
        def loss(m):
            logits = m(**features)
            return jnp.mean(jax.nn.log_softmax(logits)[..., 3])
        return nnx.value_and_grad(loss)(model)

    results = {impl: loss_and_grads(t5_fakes.with_config(trained, cfg.replace(kernels=impl))) for impl in ("cpu", "xla")}
    np.testing.assert_allclose(float(results["cpu"][0]), float(results["xla"][0]), rtol=1e-6)
    cpu, xla = (jax.tree.leaves(nnx.to_pure_dict(results[k][1])) for k in ("cpu", "xla"))
    assert len(cpu) == len(xla) > 0
    for a, b in zip(cpu, xla):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5, rtol=1e-4)


def test_dropout_needs_a_key_and_differs_per_key(pairs):
    _, cfg, trained = pairs["flan_t5"]
    model = t5_fakes.with_config(trained, cfg.replace(dropout_rate=0.3))
    enc, dec = t5_fakes.random_ids((1, 9), 3), t5_fakes.random_ids((1, 5), 4)
    plain = t5_fakes.logits(model, encoder_input_tokens=enc, decoder_input_tokens=dec)  # no key: no dropout
    reference = t5_fakes.hf_logits(pairs["flan_t5"][0], enc, dec)
    np.testing.assert_allclose(plain, reference, atol=1e-4, rtol=1e-4)
    a, b, again = (
        t5_fakes.logits(model, encoder_input_tokens=enc, decoder_input_tokens=dec, dropout_rng=jax.random.key(s)) for s in (1, 2, 1)
    )
    assert not np.allclose(a, plain, atol=1e-3) and not np.allclose(a, b, atol=1e-3)
    np.testing.assert_array_equal(a, again)


def test_registry_builds_t5_and_refuses_heads():
    cfg = T5Config.for_family("t5_original", vocab_size=64, d_model=16, n_layers=1, n_decoder_layers=1, n_heads=2, head_dim=8, d_ff=32)
    model = nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0)))
    assert isinstance(model, t5.T5) and model.lm_head is None and registry.family_of(model).name == "t5"
    with pytest.raises(ValueError, match="score"):
        registry.build_model(cfg, rngs=nnx.Rngs(0), heads=("score",))


# ---------------------------------------------------------------------- generation
def _hf_greedy(hf, prompts, max_new_tokens):
    width = max(len(p) for p in prompts)
    ids = np.zeros((len(prompts), width), np.int64)
    mask = np.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, :len(p)], mask[i, :len(p)] = p, 1
    with torch.no_grad():
        out = hf.generate(input_ids=torch.as_tensor(ids), attention_mask=torch.as_tensor(mask), do_sample=False,
                          num_beams=1, max_new_tokens=max_new_tokens, min_new_tokens=0, decoder_start_token_id=0,
                          eos_token_id=1, pad_token_id=0, use_cache=False)  # its cache assumes equal depths
    rows = []
    for row in out.numpy()[:, 1:]:  # without the decoder start token
        row = list(row)
        rows.append(row[: row.index(1)] if 1 in row else row)
    return rows


@pytest.mark.parametrize("name", ["flan_t5", "t5_original"])
def test_greedy_generation_gives_transformers_tokens(pairs, name):
    hf, cfg, ours = pairs[name]
    prompts = [list(t5_fakes.random_ids((n,), 30 + n)) + [1] for n in (4, 9, 6)]  # T5 prompts end with EOS
    expected = _hf_greedy(hf, prompts, max_new_tokens=10)
    got = generate_lib.generate(ours, prompts, max_new_tokens=10, eos_id=1, pad_id=0)
    assert got == expected


def test_cached_decoding_logits_equal_the_full_forward_pass(pairs):
    _, cfg, ours = pairs["flan_t5"]
    prompts = [list(t5_fakes.random_ids((7,), 5)) + [1], list(t5_fakes.random_ids((3,), 6)) + [1]]
    gen = generate_lib.generate_arrays(ours, prompts, max_new_tokens=6, eos_id=1, pad_id=0, return_logits=True)
    for row, prompt in enumerate(prompts):
        steps = max(int(gen.lengths[row]), 1)
        decoder_inputs = np.asarray([[0, *gen.tokens[row, : steps - 1]]])
        full = t5_fakes.logits(ours, encoder_input_tokens=np.asarray([prompt]), decoder_input_tokens=decoder_inputs)
        np.testing.assert_allclose(gen.logits[row, :steps], full[0], atol=1e-4, rtol=1e-4)


def test_sampling_is_seeded_and_respects_top_k(pairs):
    _, cfg, ours = pairs["flan_t5"]
    prompts = [list(t5_fakes.random_ids((5,), 8)) + [1]] * 3

    def draw(seed, **kw):
        return generate_lib.generate_arrays(
            ours, prompts, max_new_tokens=8, eos_id=1, temperature=1.0, rng=jax.random.key(seed), return_logits=True, **kw)

    a, b = draw(0), draw(0)
    np.testing.assert_array_equal(a.tokens, b.tokens)
    assert not np.array_equal(a.tokens, draw(1).tokens)
    top = draw(2, top_k=2)
    for row in range(3):
        for step in range(int(top.lengths[row])):
            assert top.tokens[row, step] in np.argsort(top.logits[row, step])[-2:]


def test_packed_scoring_gives_transformers_log_likelihoods_of_each_target(pairs):
    """The evaluator's scoring (rank classification, per-task loss) of T5: several (prompt, target)
    pairs packed into encoder / decoder rows score what transformers gives each pair alone."""
    from flan_jax.eval import scoring

    hf, cfg, ours = pairs["flan_t5"]
    sequences = [(list(t5_fakes.random_ids((n,), 40 + n)) + [1], list(t5_fakes.random_ids((m,), 50 + m)) + [1])
                 for n, m in [(6, 2), (11, 4), (3, 1), (8, 3), (5, 5)]]
    scores = scoring.score_targets(ours, sequences, max_len=(24, 8), batch_rows=2)
    for (prompt, target), score in zip(sequences, scores):
        logits = t5_fakes.hf_logits(hf, np.asarray([prompt]), np.asarray([[0, *target[:-1]]]))[0]
        log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) - logits.max(-1, keepdims=True)
        expected = float(log_probs[np.arange(len(target)), target].sum())
        assert score.num_tokens == len(target) and not score.truncated
        assert score.log_likelihood == pytest.approx(expected, rel=1e-4, abs=1e-4)
    (cut,) = scoring.score_targets(ours, [(list(range(2, 40)) + [1], [5, 6, 1])], max_len=(16, 8))
    assert cut.truncated and cut.num_tokens == 3  # the prompt lost its middle, the target stayed whole
