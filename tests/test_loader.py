"""The training loader: determinism, exact restore (also through Orbax), process shards, epochs, counts."""

import json
import logging
import re

import grain
import numpy as np
import orbax.checkpoint as ocp
import pytest
from data_fakes import data_config, example_source, fake_examples, register_fake_tasks, tiny_tokenizer, unregister_all

from flan_jax import data
from flan_jax.data import loader, packing


def _iterator(config=None, *, examples=None, seed=0, process_index=0, process_count=1):
    return loader.make_train_iterator(
        config or data_config(),
        tiny_tokenizer(),
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        examples=examples if examples is not None else example_source(fake_examples(400), shuffle_seed=seed),
    )


def _take(iterator, n):
    return [next(iterator) for _ in range(n)]


def _assert_batches_equal(actual, expected):
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        assert a.keys() == e.keys()
        for key in e:
            np.testing.assert_array_equal(a[key], e[key], err_msg=key)


def _example_ids(batch):
    """Ids (`#i:` prefixes) of the examples in each row of a batch, row by row."""
    tok = tiny_tokenizer()
    ids = []
    for row in range(batch["segment_ids"].shape[0]):
        row_ids = []
        for segment in range(1, int(batch["segment_ids"][row].max()) + 1):
            text = tok.decode(batch["input_tokens"][row][batch["segment_ids"][row] == segment])
            row_ids.append(int(re.match(r"#(\d+):", text).group(1)))
        ids.append(row_ids)
    return ids


def test_batches_have_the_contract_shapes_and_dtypes():
    batch = next(_iterator())
    assert set(batch) == set(packing.BATCH_KEYS)
    for key, value in batch.items():
        assert value.shape == (4, 64), key
        assert value.dtype == (np.float32 if key == "loss_weights" else np.int32), key
    assert packing.fill_rate(batch) > 0.5


def test_same_seed_same_batches_other_seed_other_batches():
    first = _take(_iterator(seed=7), 5)
    _assert_batches_equal(_take(_iterator(seed=7), 5), first)
    other = _take(_iterator(seed=8), 5)
    assert not np.array_equal(other[0]["input_tokens"], first[0]["input_tokens"])


@pytest.mark.parametrize("pack", [True, False])
def test_restored_state_gives_exactly_the_next_batches(pack):
    config = data_config(pack=pack, seq_len=32)  # short rows: some examples are truncated and counted
    iterator = _iterator(config)
    _take(iterator, 3)
    state = json.loads(json.dumps(iterator.get_state()))  # what a checkpoint stores
    counts = iterator.stats.to_dict()
    expected = _take(iterator, 12)
    restored = _iterator(config)
    restored.set_state(state)
    assert restored.stats.to_dict() == counts  # the counts are part of the state
    _assert_batches_equal(_take(restored, 12), expected)
    assert iterator.stats.total().truncated > 0
    assert restored.stats.to_dict() == iterator.stats.to_dict()


def test_restore_through_an_orbax_composite_checkpoint(tmp_path):
    iterator = _iterator()
    _take(iterator, 5)
    options = ocp.CheckpointManagerOptions(enable_async_checkpointing=False)
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        manager.save(5, args=ocp.args.Composite(dl_iter=grain.checkpoint.CheckpointSave(iterator)))
    expected = _take(iterator, 6)
    restored = _iterator()
    with ocp.CheckpointManager(tmp_path / "ckpt", options=options) as manager:
        manager.restore(5, args=ocp.args.Composite(dl_iter=grain.checkpoint.CheckpointRestore(restored)))
    _assert_batches_equal(_take(restored, 6), expected)


@pytest.mark.parametrize("pack", [True, False])
def test_two_process_shards_concatenate_to_the_single_process_batch(pack):
    config = data_config(pack=pack)
    single = _take(_iterator(config), 10)
    shards = [_take(_iterator(config, process_index=p, process_count=2), 10) for p in range(2)]
    for step, batch in enumerate(single):
        assert shards[0][step]["input_tokens"].shape == (2, 64)
        joined = {key: np.concatenate([shards[0][step][key], shards[1][step][key]]) for key in batch}
        _assert_batches_equal([joined], [batch])
    ids = [{i for batch in shard for row in _example_ids(batch) for i in row} for shard in shards]
    assert not ids[0] & ids[1], "the two processes must read disjoint examples"


def test_process_shards_are_disjoint_and_cover_one_epoch():
    examples = fake_examples(24)
    config = data_config(pack=False)  # one example per row: 6 steps x 4 rows = one epoch
    seen = []
    for process in range(2):
        iterator = _iterator(config, examples=example_source(examples), process_index=process, process_count=2)
        seen.append([i for batch in _take(iterator, 6) for row in _example_ids(batch) for i in row])
    assert not set(seen[0]) & set(seen[1])
    assert sorted(seen[0] + seen[1]) == list(range(24))


def test_a_small_task_repeats_for_several_epochs_in_new_orders():
    examples = fake_examples(6)
    config = data_config(pack=False, batch_size=2)
    iterator = _iterator(config, examples=example_source(examples, shuffle_seed=3))
    order = [i for batch in _take(iterator, 12) for row in _example_ids(batch) for i in row]
    epochs = [order[k : k + 6] for k in range(0, 24, 6)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(6))
    assert len({tuple(epoch) for epoch in epochs}) > 1, "each epoch should be reshuffled"


def test_packed_stream_over_many_epochs_keeps_every_example():
    examples = fake_examples(10)
    config = data_config(batch_size=2, num_packing_bins=2, seq_len=128)
    iterator = _iterator(config, examples=example_source(examples, shuffle_seed=1))
    ids = [i for batch in _take(iterator, 30) for row in _example_ids(batch) for i in row]
    counts = np.bincount(ids, minlength=10)
    assert counts.min() >= counts.max() - 2  # examples are drawn evenly, epoch after epoch
    assert counts.min() >= 5


def test_overlong_examples_are_counted_and_logged(caplog):
    config = data_config(seq_len=24)
    with caplog.at_level(logging.WARNING):
        iterator = _iterator(config)
        _take(iterator, 4)
    total = iterator.stats.total()
    assert total.truncated + total.response_truncated > 0
    assert total.dropped == 0
    assert "over-long examples" in caplog.text
    dropping = _iterator(data_config(seq_len=24, overlong="drop"))
    _take(dropping, 4)
    assert dropping.stats.total().dropped > 0
    assert dropping.stats.total().truncated == 0


def test_mismatched_settings_and_missing_row_slots_are_refused():
    with pytest.raises(ValueError, match="divisible by the process count 3"):
        _iterator(process_count=3)
    state = _iterator().get_state()
    with pytest.raises(ValueError, match="seq_len: 64 -> 32"):
        _iterator(data_config(seq_len=32)).set_state(state)
    with pytest.raises(ValueError, match=r"lacks row slots \[2, 3\]"):
        _iterator(process_index=1, process_count=2).set_state(_iterator(process_index=0, process_count=2).get_state())


def test_resume_under_another_process_count_continues_each_row_slot():
    single = _iterator()
    _take(single, 2)
    one_process_state = single.get_state()
    expected = _take(single, 3)
    rows = expected[0]["input_tokens"].shape[0]

    # 1 process -> 2: each process takes its own row slots from the one state.
    halves = []
    for index in range(2):
        half = _iterator(process_index=index, process_count=2)
        half.set_state(one_process_state)
        halves.append(_take(half, 3))
    for step, batch in enumerate(expected):
        for key in batch:
            np.testing.assert_array_equal(
                np.concatenate([halves[0][step][key], halves[1][step][key]]), batch[key], err_msg=key
            )

    # 2 processes -> 1: their states merge by row slot.
    two = [_iterator(process_index=i, process_count=2) for i in range(2)]
    for it in two:
        _take(it, 2)
    merged = loader.merge_process_states([it.get_state() for it in two])
    resumed = _iterator()
    resumed.set_state(merged)
    _assert_batches_equal(_take(resumed, 3), expected)
    assert rows == 4


@pytest.fixture
def registered():
    names = register_fake_tasks("loader_", {"a": 30, "b": 12})
    yield
    unregister_all(names)


def test_a_registered_mixture_is_read_by_name(registered):
    config = data_config(train_mixture="loader_mix")

    def batches(process_index=0, process_count=1):
        it = loader.make_train_iterator(
            config, tiny_tokenizer(), seed=0, process_index=process_index, process_count=process_count
        )
        return _take(it, 6)

    single = batches()
    _assert_batches_equal(batches(), single)
    halves = [batches(p, 2) for p in range(2)]
    for step, batch in enumerate(single):
        _assert_batches_equal([{k: np.concatenate([halves[0][step][k], halves[1][step][k]]) for k in batch}], [batch])


def test_a_registered_task_alone_repeats_with_reshuffled_epochs(registered):
    config = data_config(train_mixture="loader_b", pack=False)  # 12 records, 4 rows a step
    iterator = loader.make_train_iterator(config, tiny_tokenizer(), seed=0, process_index=0, process_count=1)
    order = [i for batch in _take(iterator, 9) for row in _example_ids(batch) for i in row]
    epochs = [order[k : k + 12] for k in range(0, 36, 12)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(12))
    assert len({tuple(epoch) for epoch in epochs}) == 3


def test_worker_processes_give_a_restorable_stream():
    """worker_count > 0 (grain worker processes): deterministic and restorable too."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (JAX_STACK_NOTES gotcha 7)
    config = data_config(worker_count=2)
    iterator = _iterator(config)
    _take(iterator, 3)
    state = iterator.get_state()
    expected = _take(iterator, 3)
    iterator.close()
    restored = _iterator(config)
    restored.set_state(state)
    _assert_batches_equal(_take(restored, 3), expected)
    restored.close()


def test_real_t0_mixture_packs_densely(real_data_dir):
    """The real T0 mixture end to end: long documents truncated and counted, rows nearly full."""
    from flan_jax.data import tokenizer as tokenizer_lib

    data.import_task_modules([data.BUILTIN_TASK_MODULE])
    texts = tokenizer_lib.mixture_texts("t0", num_examples=300)
    tok = tokenizer_lib.SentencePieceTokenizer(tokenizer_lib.train_sentencepiece(texts, 2000))
    config = data_config(train_mixture="t0", seq_len=1024, batch_size=2, num_packing_bins=16)
    iterator = loader.make_train_iterator(config, tok, seed=0, process_index=0, process_count=1)
    batches = _take(iterator, 40)
    for batch in batches:
        assert batch["input_tokens"].shape == (2, 1024)
        assert np.all(batch["input_tokens"][batch["segment_ids"] == 0] == 0)
    assert packing.fill_rate({"segment_ids": np.concatenate([b["segment_ids"] for b in batches])}) > 0.98
    total = iterator.stats.total()
    assert total.truncated > 0 and total.dropped == 0  # T0 has documents longer than 1024 tokens
    assert len(iterator.stats.by_task) > 20
