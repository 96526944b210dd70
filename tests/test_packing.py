"""Packing: every example comes out of the packed rows exactly once and exactly as it went in.

`OpenRows` is the loader's packer; `pack` (grain's best-fit) is the baseline it is compared with.
"""

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


def _check_row_layout(rows):
    """Every packed row has the batch keys, length SEQ_LEN and the dtypes of docs/design.md."""
    for row in rows:
        assert set(row) == set(packing.BATCH_KEYS)
        assert all(v.shape == (SEQ_LEN,) for v in row.values())
        assert row["loss_weights"].dtype == np.float32
        assert all(row[k].dtype == np.int32 for k in packing.BATCH_KEYS if k != "loss_weights")


def test_open_rows_carry_every_example_exactly_once_and_unchanged():
    examples = _random_features(300)
    rows = packing.pack_list(examples, seq_len=SEQ_LEN, num_open_rows=4)
    _check_row_layout(rows)
    _check_same_examples(rows, examples)
    steady = packing.pack_list(examples, seq_len=SEQ_LEN, num_open_rows=4, flush=False)
    assert packing.fill_rate(steady) > 0.9
    assert len(rows) - len(steady) <= 4  # only the rows still open at the end were flushed


def test_open_rows_emit_full_rows_at_once_and_the_fullest_row_when_nothing_fits():
    def add(key, length):
        """Adds an example of exactly `length` features; returns the segment ids of the row emitted."""
        features, _ = build_features([50] * (length - 2), [60], bos_id=2, eos_id=3, config=FeatureConfig(seq_len=10))
        assert len(features["input_tokens"]) == length
        row = packer.add(key, features)
        return None if row is None else list(row["segment_ids"])

    packer = packing.OpenRows(seq_len=10, num_open_rows=2)
    assert add("a", 6) is None
    assert add("b", 7) is None  # does not fit next to a: a second open row
    assert add("c", 3) == [1] * 7 + [2] * 3  # tightest fit is b's row (3 free, not a's 4): full, out at once
    assert packer.keys() == [["a"]]
    assert add("d", 5) is None
    assert add("e", 5) == [1] * 5 + [2] * 5
    assert add("f", 8) is None  # fits nowhere, one row open: opens a second
    assert packer.keys() == [["a"], ["f"]]
    assert add("g", 5) == [1] * 8 + [0] * 2  # fits nowhere, two rows open: the fullest (f) makes room
    assert packer.keys() == [["a"], ["g"]]
    assert add("h", 10) == [1] * 10  # a full-length example goes straight out
    assert packer.keys() == [["a"], ["g"]]
    assert [list(row["segment_ids"]) for row in packer.flush()] == [[1] * 6 + [0] * 4, [1] * 5 + [0] * 5]
    assert packer.keys() == []


def test_open_rows_restore_from_keys_continues_identically():
    examples = _random_features(200, seed=5)
    first = packing.OpenRows(SEQ_LEN, 6)
    for i in range(100):
        first.add(i, examples[i])
    second = packing.OpenRows(SEQ_LEN, 6)
    second.restore([[(key, examples[key]) for key in keys] for keys in first.keys()])
    for i in range(100, 200):
        a, b = first.add(i, examples[i]), second.add(i, examples[i])
        assert (a is None) == (b is None)
        if a is not None:
            for key in packing.BATCH_KEYS:
                np.testing.assert_array_equal(a[key], b[key])


def test_open_rows_fill_better_than_grain_bins_of_the_same_count():
    examples = _random_features(400, seed=2)
    open_rows = packing.pack_list(examples, seq_len=SEQ_LEN, num_open_rows=4, flush=False)
    source = grain.MapDataset.source(examples).to_iter_dataset()
    grain_rows = list(packing.pack(source, seq_len=SEQ_LEN, num_packing_bins=4, seed=0))[:-4]
    assert packing.fill_rate(open_rows) > packing.fill_rate(grain_rows)


def test_grain_packed_rows_carry_every_example_exactly_once_and_unchanged():
    examples = _random_features(300)
    rows = list(packing.pack(grain.MapDataset.source(examples).to_iter_dataset(), seq_len=SEQ_LEN, num_packing_bins=8, seed=0))
    _check_row_layout(rows)
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
    rows = packing.pack_list(examples, seq_len=128, num_open_rows=4)
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
    with pytest.raises(ValueError, match="does not fit"):
        packing.OpenRows(4, 2).add(0, features)


def test_steady_state_fill_matches_a_long_stream():
    examples = _random_features(50, seed=3)
    estimate = packing.steady_state_fill(examples, seq_len=SEQ_LEN, num_open_rows=4)
    long_stream = packing.pack_list(examples * 40, seq_len=SEQ_LEN, num_open_rows=4, flush=False)
    assert estimate == pytest.approx(packing.fill_rate(long_stream), abs=0.01)
    assert packing.steady_state_fill(examples[:1], seq_len=SEQ_LEN, num_open_rows=4) > 0.5
    assert packing.steady_state_fill([], seq_len=SEQ_LEN, num_open_rows=4) == 0.0
