"""The pairs converter: layout by hand, left truncation (counted), packed == one pair per row, loader rows."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fakes import data_config, tiny_tokenizer
from flax import nnx

import flan_jax_tasks  # noqa: F401  (registers the built-in tasks and pairs)
from flan_jax import data
from flan_jax import model as fm
from flan_jax.data import converters, loader
from flan_jax.data.converters.pairs import build_pair_features, build_pair_row
from flan_jax.data.features import FeatureConfig, FeatureStats, Outcome
from flan_jax.train import pairs as pairs_lib
from tests import preference_fakes as fakes

BOS, EOS = 2, 3


def _pair(prompt, chosen, rejected, seq_len=32, **kwargs):
    return build_pair_features(prompt, chosen, rejected, bos_id=BOS, eos_id=EOS, config=FeatureConfig(seq_len=seq_len, **kwargs))


def test_layout_by_hand():
    features, outcome = _pair([10, 11], [20, 21], [30])
    assert outcome is Outcome.KEPT
    np.testing.assert_array_equal(features["input_tokens"], [BOS, 10, 11, 20, 21, BOS, 10, 11, 30])
    np.testing.assert_array_equal(features["target_tokens"], [10, 11, 20, 21, EOS, 10, 11, 30, EOS])
    np.testing.assert_array_equal(features["response_role"], [0, 0, 1, 1, 1, 0, 0, 2, 2])
    np.testing.assert_array_equal(features["loss_weights"], [0, 0, 1, 1, 1, 0, 0, 1, 1])
    np.testing.assert_array_equal(features["positions"], [0, 1, 2, 3, 4, 0, 1, 2, 3])
    np.testing.assert_array_equal(features["prefix_mask"], [1, 1, 1, 0, 0, 1, 1, 1, 0])
    row = build_pair_row([features, _pair([12], [22], [31, 32])[0]], 24)
    np.testing.assert_array_equal(row["segment_ids"][:16], [1] * 5 + [2] * 4 + [3] * 3 + [4] * 4)
    np.testing.assert_array_equal(row["pair_ids"][:16], [1] * 9 + [2] * 7)
    assert not row["segment_ids"][16:].any() and not row["pair_ids"][16:].any() and not row["response_role"][16:].any()


def test_overlong_pairs_lose_the_start_of_the_prompt_in_both_halves_and_keep_both_responses():
    prompt = list(range(100, 140))  # 40 prompt tokens; responses 3 + 2; budget (32 - 7) // 2 = 12 prompt tokens
    features, outcome = _pair(prompt, [20, 21, 22], [30, 31])
    assert outcome is Outcome.TRUNCATED and len(features["input_tokens"]) == 31
    kept = list(range(128, 140))
    np.testing.assert_array_equal(features["input_tokens"], [BOS, *kept, 20, 21, 22, BOS, *kept, 30, 31])
    # Responses that leave fewer than seq_len // 8 prompt tokens are dropped, never cut.
    assert _pair(prompt, list(range(20, 32)), list(range(40, 52)))[1] is Outcome.DROPPED
    assert _pair([1, 2, 3], list(range(20, 35)), list(range(40, 55)))[1] is Outcome.DROPPED
    assert _pair(prompt, [20], [30], overlong="drop") == (None, Outcome.DROPPED)
    with pytest.raises(ValueError, match="loss_on_inputs"):
        _pair([10], [20], [30], loss_on_inputs=True)


def test_the_converter_counts_outcomes_and_names_non_pair_examples():
    tokenizer = tiny_tokenizer()
    featurizer = loader.Featurizer(tokenizer, FeatureConfig(seq_len=32), FeatureStats(), converters.PAIRS)
    long_prompt = " ".join(["alpha beta gamma"] * 40)
    for prompt in ("alpha", long_prompt):
        featurizer({"inputs": prompt, "chosen": " beta", "rejected": " gamma", "task": "t"})
    assert featurizer({"inputs": "x", "chosen": " " + long_prompt, "rejected": " b", "task": "t", "origin": "f:3"}) is None
    counts = featurizer.stats.by_task["t"]
    assert (counts.examples, counts.truncated, counts.dropped) == (3, 1, 1)
    with pytest.raises(data.DataError, match="field 'chosen'.*PreferenceTask"):
        featurizer({"inputs": "x", "targets": "y", "task": "sft"})


@pytest.fixture(scope="module")
def tiny_model():
    cfg = fm.ModelConfig.from_config(_model_config())
    model = nnx.jit(lambda: fm.Transformer(cfg, rngs=nnx.Rngs(0)))()
    forward = nnx.jit(lambda m, tokens, positions, segments: m(tokens, positions=positions, segment_ids=segments))
    return lambda tokens, positions=None, segment_ids=None: forward(model, tokens, positions, segment_ids)


def _model_config():
    from flan_jax import default_config

    config = default_config.get_config().model
    config.update(vocab_size=fakes.VOCAB, d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=64,
                  max_positions=128, attention="xla", init_std=0.3)
    return config


def _sums(model, batch):
    batch = {k: jnp.asarray(v) for k, v in batch.items()}
    logits = model(batch["input_tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
    valid = np.asarray(pairs_lib.valid_pairs(batch))
    return [np.asarray(x)[valid] for x in pairs_lib.response_log_probs(logits, batch)]


def test_packed_pairs_have_the_per_response_log_probs_of_one_pair_per_row(tiny_model):
    pairs = fakes.random_pairs(8, seed=5)
    packed = _sums(tiny_model, fakes.packed_batch(pairs, pairs_per_row=4))
    alone = _sums(tiny_model, fakes.packed_batch(pairs, pairs_per_row=1))
    for a, b in zip(packed, alone):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # Against the model on each response alone, unpacked (right-padded, plain causal attention):
    # the packed segments are isolated from each other.
    sequences = [[fakes.BOS, *p, *r, fakes.EOS] for p, c, r0 in pairs for r in (c, r0)]
    width = max(map(len, sequences))
    tokens = np.array([s + [0] * (width - len(s)) for s in sequences], np.int32)
    logp = np.asarray(jax.nn.log_softmax(tiny_model(jnp.asarray(tokens[:, :-1])), axis=-1))
    for i, (prompt, _, _) in enumerate(pairs):
        for side in (0, 1):
            seq = sequences[2 * i + side]
            expected = sum(logp[2 * i + side, t, seq[t + 1]] for t in range(len(prompt), len(seq) - 1))
            np.testing.assert_allclose(packed[side][i], expected, rtol=1e-5, atol=1e-5)
    lengths = [np.asarray(x)[np.asarray(pairs_lib.valid_pairs(b))] for b in [fakes.packed_batch(pairs, pairs_per_row=4)]
               for x in pairs_lib.response_lengths(b)]
    np.testing.assert_array_equal(lengths[0], [len(c) + 1 for _, c, _ in pairs])
    np.testing.assert_array_equal(lengths[1], [len(r) + 1 for _, _, r in pairs])


def test_last_response_positions_mark_one_position_per_response():
    batch = fakes.packed_batch(fakes.random_pairs(6, seed=2), pairs_per_row=3)
    last = np.asarray(pairs_lib.last_response_positions({k: jnp.asarray(v) for k, v in batch.items()}))
    assert last.sum() == 12
    assert (batch["target_tokens"][last] == fakes.EOS).all()  # the position that predicts EOS


def _pairs_config(**overrides):
    return data_config(train_mixture="synthetic_pairs_train", seq_len=96, batch_size=4, **overrides)


def test_loader_keeps_both_halves_of_every_pair_in_one_row_and_resumes_exactly():
    tokenizer = tiny_tokenizer()
    iterator = loader.make_train_iterator(_pairs_config(), tokenizer, seed=0, process_index=0, process_count=1,
                                          converter=converters.PAIRS)
    for _ in range(3):
        batch = next(iterator)
        assert set(batch) == set(converters.PAIRS.batch_keys)
        for row in range(batch["pair_ids"].shape[0]):
            pair_ids, segments, roles = batch["pair_ids"][row], batch["segment_ids"][row], batch["response_role"][row]
            for k in set(pair_ids[pair_ids > 0].tolist()):
                assert set(segments[pair_ids == k].tolist()) == {2 * k - 1, 2 * k}
                assert set(roles[pair_ids == k].tolist()) == {0, 1, 2}
    state = iterator.get_state()
    assert state["pipeline"]["converter"] == "pairs"
    expected = next(iterator)
    iterator.set_state(state)
    assert all(np.array_equal(expected[k], v) for k, v in next(iterator).items())


def test_two_processes_see_the_rows_of_one(monkeypatch):
    tokenizer = tiny_tokenizer()
    make = lambda i, n: loader.make_train_iterator(  # noqa: E731
        _pairs_config(), tokenizer, seed=3, process_index=i, process_count=n, converter=converters.PAIRS)
    whole, halves = make(0, 1), [make(0, 2), make(1, 2)]
    for _ in range(2):
        one = next(whole)
        two = [next(h) for h in halves]
        for key in one:
            np.testing.assert_array_equal(one[key], np.concatenate([t[key] for t in two]))
