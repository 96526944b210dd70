"""Packing: every example comes out of the packed rows exactly once and exactly as it went in."""

import random

import grain
import numpy as np
import pytest
from data_fakes import fake_examples, tiny_tokenizer

from flan_jax.data import packing
from flan_jax.data.features import FEATURE_KEYS, FeatureConfig, build_features, featurize

SEQ_LEN = 48


def _random_features(n, seed=0):
    rng = random.Random(seed)
    config = FeatureConfig(seq_len=SEQ_LEN)
    examples = []
    for i in range(n):
        # A unique first instruction token identifies each example.
        inputs = [1000 + i] + [rng.randint(10, 99) for _ in range(rng.randint(0, 20))]
        targets = [rng.randint(10, 99) for _ in range(rng.randint(1, 10))]
        features, _ = build_features(inputs, targets, bos_id=2, eos_id=3, config=config)
        examples.append(features)
    return examples


def _segments(row):
    """The per-example slices of a packed row, in segment order."""
    segment_ids = row["segment_ids"]
    count = int(segment_ids.max())
    assert set(np.unique(segment_ids)) <= set(range(count + 1))
    found = []
    for segment in range(1, count + 1):
        where = np.flatnonzero(segment_ids == segment)
        assert len(where) and np.all(np.diff(where) == 1), "a segment must be contiguous"
        np.testing.assert_array_equal(row["positions"][where], np.arange(len(where)))
        found.append({key: row[key][where] for key in FEATURE_KEYS})
    padding = segment_ids == 0
    for key in ("input_tokens", "target_tokens", "positions", "loss_weights", "prefix_mask"):
        assert not np.any(row[key][padding]), f"{key} must be 0 on padding"
    return found


def _check_same_examples(rows, examples):
    by_id = {int(e["input_tokens"][1]): e for e in examples}
    seen = []
    for row in rows:
        for segment in _segments(row):
            key = int(segment["input_tokens"][1])
            seen.append(key)
            for name in FEATURE_KEYS:
                np.testing.assert_array_equal(segment[name], by_id[key][name], err_msg=name)
    assert sorted(seen) == sorted(by_id), "examples lost or duplicated"


def test_packed_rows_carry_every_example_exactly_once_and_unchanged():
    examples = _random_features(300)
    rows = list(packing.pack(grain.MapDataset.source(examples).to_iter_dataset(), seq_len=SEQ_LEN, num_packing_bins=8, seed=0))
    for row in rows:
        assert set(row) == set(packing.BATCH_KEYS)
        assert all(v.shape == (SEQ_LEN,) for v in row.values())
        assert row["loss_weights"].dtype == np.float32
        assert all(row[k].dtype == np.int32 for k in packing.BATCH_KEYS if k != "loss_weights")
    _check_same_examples(rows, examples)
    padded = [packing.pad_one(e, SEQ_LEN) for e in examples]
    _check_same_examples(padded, examples)
    assert len(rows) < len(padded) / 2
    assert packing.fill_rate(rows) > 0.9 > 2 * packing.fill_rate(padded)


def test_packed_rows_match_unpacked_tokenized_examples():
    tok = tiny_tokenizer()
    config = FeatureConfig(seq_len=128)
    rendered = fake_examples(60)
    examples = [featurize(e, tok, config)[0] for e in rendered]
    source = grain.MapDataset.source(examples).to_iter_dataset()
    rows = list(packing.pack(source, seq_len=128, num_packing_bins=4, seed=3))
    texts = []
    for row in rows:
        for segment in _segments(row):
            tokens = [*segment["input_tokens"], segment["target_tokens"][-1]]
            texts.append(tok.decode(tokens))
            response = tok.decode(segment["target_tokens"][segment["loss_weights"] == 1])
            assert texts[-1].endswith(response)
    assert sorted(texts) == sorted(e["inputs"] + e["targets"] for e in rendered)


def test_packing_is_deterministic_given_the_seed():
    examples = _random_features(100)

    def rows(seed):
        ds = grain.MapDataset.source(examples).to_iter_dataset()
        return [r["input_tokens"] for r in packing.pack(ds, seq_len=SEQ_LEN, num_packing_bins=8, seed=seed)]

    np.testing.assert_array_equal(rows(1), rows(1))
    assert not np.array_equal(rows(1), rows(2))  # the seed orders rows within a packing group


def test_pad_one_rejects_an_example_longer_than_the_row():
    (features,) = _random_features(1)
    with pytest.raises(ValueError, match="does not fit"):
        packing.pad_one(features, 4)
