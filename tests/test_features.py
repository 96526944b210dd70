"""Features: the BOS/EOS shift, loss weights and prefix mask by hand, and the over-long policies."""

import json
import random

import numpy as np
import pytest
from data_fakes import fake_examples, tiny_tokenizer

from flan_jax.data.features import FeatureConfig, FeatureStats, Outcome, build_features, featurize

BOS, EOS = 2, 3


def _build(inputs, targets, seq_len=16, **kwargs):
    return build_features(inputs, targets, bos_id=BOS, eos_id=EOS, config=FeatureConfig(seq_len=seq_len, **kwargs))


def test_layout_by_hand():
    features, outcome = _build([10, 11, 12], [20, 21])
    assert outcome is Outcome.KEPT
    np.testing.assert_array_equal(features["input_tokens"], [BOS, 10, 11, 12, 20, 21])
    np.testing.assert_array_equal(features["target_tokens"], [10, 11, 12, 20, 21, EOS])
    np.testing.assert_array_equal(features["loss_weights"], [0, 0, 0, 1, 1, 1])
    np.testing.assert_array_equal(features["prefix_mask"], [1, 1, 1, 1, 0, 0])
    assert features["input_tokens"].dtype == np.int32
    assert features["loss_weights"].dtype == np.float32
    assert features["prefix_mask"].dtype == np.int32


def test_loss_on_inputs_weights_every_position():
    features, _ = _build([10, 11, 12], [20, 21], loss_on_inputs=True)
    np.testing.assert_array_equal(features["loss_weights"], np.ones(6))
    np.testing.assert_array_equal(features["prefix_mask"], [1, 1, 1, 1, 0, 0])


def test_an_example_that_exactly_fits_is_kept():
    features, outcome = _build(list(range(100, 110)), [20, 21, 22, 23, 24], seq_len=16)
    assert outcome is Outcome.KEPT
    assert len(features["input_tokens"]) == 16


def test_truncate_cuts_the_middle_of_the_instruction_and_keeps_the_response():
    inputs = list(range(100, 120))  # 20 instruction tokens, 3 response tokens, room for 15 of 23
    features, outcome = _build(inputs, [20, 21, 22], seq_len=16)
    assert outcome is Outcome.TRUNCATED
    kept_inputs = [100, 101, 102, 103, 104, 105, 114, 115, 116, 117, 118, 119]  # 6 head + 6 tail
    np.testing.assert_array_equal(features["input_tokens"], [BOS, *kept_inputs, 20, 21, 22])
    np.testing.assert_array_equal(features["target_tokens"], [*kept_inputs, 20, 21, 22, EOS])
    np.testing.assert_array_equal(features["loss_weights"], [0] * 12 + [1] * 4)


def test_an_over_long_response_is_cut_at_its_end_without_eos():
    targets = list(range(200, 230))  # 30 response tokens, 10 instruction tokens, seq_len 16
    features, outcome = _build(list(range(100, 110)), targets, seq_len=16)
    assert outcome is Outcome.RESPONSE_TRUNCATED
    # The instruction keeps a quarter of the 15-token budget (3: head 1, tail 2), the response the rest.
    np.testing.assert_array_equal(features["input_tokens"], [BOS, 100, 108, 109, *range(200, 212)])
    np.testing.assert_array_equal(features["target_tokens"], [100, 108, 109, *range(200, 213)])
    assert EOS not in features["target_tokens"]
    np.testing.assert_array_equal(features["loss_weights"], [0] * 3 + [1] * 13)


def test_drop_policy_drops_over_long_examples_only():
    assert _build(list(range(100, 120)), [20], seq_len=16, overlong="drop") == (None, Outcome.DROPPED)
    features, outcome = _build([10], [20], seq_len=16, overlong="drop")
    assert outcome is Outcome.KEPT and len(features["input_tokens"]) == 3


def test_invalid_policy_names_the_config_field():
    with pytest.raises(ValueError, match="config.data.overlong='cut'"):
        FeatureConfig(seq_len=16, overlong="cut")


def test_random_lengths_always_fit_and_keep_the_response_when_possible():
    rng = random.Random(0)
    seq_len = 32
    for _ in range(500):
        inputs = list(range(100, 100 + rng.randint(0, 60)))
        targets = list(range(500, 500 + rng.randint(0, 40)))
        features, outcome = _build(inputs, targets, seq_len=seq_len)
        length = len(features["input_tokens"])
        assert length <= seq_len
        np.testing.assert_array_equal(features["input_tokens"][1:], features["target_tokens"][:-1])
        response = features["target_tokens"][features["loss_weights"] == 1]
        if outcome in (Outcome.KEPT, Outcome.TRUNCATED):
            np.testing.assert_array_equal(response, [*targets, EOS])
        else:
            np.testing.assert_array_equal(response, targets[: len(response)])
        if outcome is Outcome.KEPT:
            assert length == len(inputs) + len(targets) + 1
        else:
            assert length >= seq_len - 1  # truncation fills the row


def test_featurize_with_a_real_tokenizer_reproduces_the_text():
    tok = tiny_tokenizer()
    example = fake_examples(1)[0]
    features, outcome = featurize(example, tok, FeatureConfig(seq_len=512))
    assert outcome is Outcome.KEPT
    tokens = [*features["input_tokens"], features["target_tokens"][-1]]
    assert tokens[0] == tok.bos_id and tokens[-1] == tok.eos_id
    assert tok.decode(tokens) == example["inputs"] + example["targets"]
    response = features["target_tokens"][features["loss_weights"] == 1]
    assert tok.decode(response) == example["targets"]


def test_feature_stats_count_per_task_and_survive_a_round_trip():
    stats = FeatureStats()
    stats.add("a", Outcome.KEPT, 10)
    stats.add("a", Outcome.TRUNCATED, 16)
    stats.add("b", Outcome.DROPPED, 0)
    stats.add("b", Outcome.RESPONSE_TRUNCATED, 16)
    total = stats.total()
    assert (total.examples, total.tokens, total.truncated, total.response_truncated, total.dropped) == (4, 42, 1, 1, 1)
    assert total.overlong == 3
    assert stats.by_task["a"].truncated == 1 and stats.by_task["b"].dropped == 1
    assert stats.to_dict()["b"] == {
        "examples": 2, "tokens": 16, "truncated": 0, "response_truncated": 1, "dropped": 1
    }
    restored = FeatureStats()
    restored.restore(json.loads(json.dumps(stats.snapshot())))  # as a checkpoint stores it
    assert restored.to_dict() == stats.to_dict()
    merged = FeatureStats()
    merged.merge(stats)
    merged.merge(restored)
    assert merged.total().examples == 8 and merged.by_task["a"].tokens == 52
    assert "4 examples: 1 instruction-truncated, 1 response-truncated, 1 dropped" == stats.summary()
