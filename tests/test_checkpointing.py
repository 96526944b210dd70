"""Orbax checkpoints: round trip, restore onto another mesh, data iterator state, retention, corruption."""

import grain
import jax
import numpy as np
import pytest
from flax import nnx

from flan_jax.train import checkpointing, exit_codes, optimizer, partitioning, state as state_lib, step
from tests import train_fakes


def _iterator():
    return iter(grain.MapDataset.range(1000).map(lambda i: {"x": np.full((2,), i)}).to_iter_dataset())


def _state_on(n_devices, shape, config):
    config.mesh.data, config.mesh.fsdp, config.mesh.tensor = shape
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:n_devices])
    rules = partitioning.axis_rules(config.mesh)
    parts = state_lib.ModelParts(lambda: train_fakes.TinyLM(rngs=nnx.Rngs(0)), mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, 10)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    return mesh, rules, parts, tx, schedule, shardings


def test_round_trip_onto_a_different_mesh_with_iterator_state(tmp_path):
    config = train_fakes.tiny_config()
    config.checkpoint.async_save = True
    mesh, rules, parts, tx, schedule, shardings = _state_on(8, (2, 2, 2), config)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    train_step = step.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    with jax.set_mesh(mesh):
        state, _ = train_step(state, partitioning.global_batch(train_fakes.packed_batch(0), partitioning.batch_sharding(mesh, rules)))
    it = _iterator()
    for _ in range(5):
        next(it)
    ckpt = checkpointing.Checkpointer(tmp_path, config.checkpoint)
    ckpt.save(1, state, it, config)
    ckpt.close()
    expected = jax.tree.map(np.asarray, state)
    assert (tmp_path / "checkpoints" / "1" / "config").is_dir()

    # Restore on 2 devices with a different layout.
    mesh2, _, parts2, tx2, _, shardings2 = _state_on(2, (1, 2, 1), config)
    abstract = state_lib.abstract_state(parts2, tx2, shardings2, seed=0)
    it2 = _iterator()
    restored = checkpointing.Checkpointer(tmp_path, config.checkpoint).restore_latest(abstract, it2)
    assert restored is not None
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored), expected)
    assert restored.params["w_in"].sharding == shardings2.params["w_in"]
    assert len(restored.params["w_in"].sharding.device_set) == 2
    assert int(restored.step) == 1
    assert int(next(it2)["x"][0]) == 5  # the iterator continues where the saved one stopped


def _save_steps(tmp_path, config, steps, metrics=None):
    mesh, rules, parts, tx, schedule, shardings = _state_on(1, (1, 1, 1), config)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    ckpt = checkpointing.Checkpointer(tmp_path, config.checkpoint)
    it = _iterator()
    for s in steps:
        next(it)
        ckpt.save(s, state, it, config, metrics=(metrics or {}).get(s))
    ckpt.close()
    return state_lib.abstract_state(parts, tx, shardings, seed=0)


def test_keeps_last_k_and_the_best_by_metric(tmp_path):
    config = train_fakes.tiny_config()
    config.checkpoint.keep = 2
    config.checkpoint.keep_best_metric = "overall/exact_match"
    metrics = {s: {"overall/exact_match": v} for s, v in [(1, 0.1), (2, 0.9), (3, 0.2), (4, 0.3), (5, 0.4)]}
    _save_steps(tmp_path, config, [1, 2, 3, 4, 5], metrics)
    kept = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
    assert kept == [2, 4, 5]


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_one(tmp_path, caplog):
    config = train_fakes.tiny_config()
    abstract = _save_steps(tmp_path, config, [2, 4])
    for f in (tmp_path / "checkpoints" / "4" / "params").rglob("*"):
        if f.is_file():
            f.write_bytes(b"")  # truncated files, as after a disk failure
    it = _iterator()
    with caplog.at_level("WARNING"):
        restored = checkpointing.Checkpointer(tmp_path, config.checkpoint).restore_latest(abstract, it)
    assert int(restored.step) == 0  # the saved state's own step counter (state was never trained)
    assert "is corrupt" in caplog.text and "/4" in caplog.text
    assert int(next(it)["x"][0]) == 1  # iterator state of checkpoint 2 (one element consumed)
    assert not (tmp_path / "checkpoints" / "4").exists()
    assert len(list((tmp_path / "checkpoints_corrupt").iterdir())) == 1


def test_config_json_round_trip():
    config = train_fakes.tiny_config()
    back = checkpointing.config_from_dict(checkpointing.config_to_dict(config))
    assert back.mesh.axis_rules == config.mesh.axis_rules
    assert back.optimizer.no_decay_patterns == config.optimizer.no_decay_patterns
    assert back.train.num_steps == config.train.num_steps


def test_when_no_checkpoint_fits_the_run_nothing_is_moved_and_the_error_is_clear(tmp_path):
    config = train_fakes.tiny_config()
    abstract = _save_steps(tmp_path, config, [2, 4])
    wrong = jax.tree.map(lambda s: jax.ShapeDtypeStruct((3, *s.shape), s.dtype, sharding=s.sharding) if s.ndim == 2 else s, abstract)
    with pytest.raises(exit_codes.NoUsableCheckpointError, match="(?s)step 4: ValueError.*checksums verify.*config .* differs"):
        checkpointing.Checkpointer(tmp_path, config.checkpoint).restore_latest(wrong, _iterator())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit()) == ["2", "4"]
    assert not (tmp_path / "checkpoints_corrupt").exists()


def _worker_iterator(num_workers):
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()  # grain workers read absl flags (JAX_STACK_NOTES gotcha 7)
    dataset = grain.MapDataset.range(1000).map(lambda i: {"x": np.full((2,), i)}).to_iter_dataset()
    return iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers)))


def test_resuming_with_another_worker_count_names_both_counts(tmp_path):
    """Each data.worker_count gives its own batch order: a changed one is refused, clearly."""
    import json

    (tmp_path / "process_0-of-1.json").write_text(json.dumps(_worker_iterator(2).get_state()))
    for current, expected in ((_iterator(), "worker_count=2 and this run uses 0"), (_worker_iterator(3), "uses 3")):
        with pytest.raises(ValueError, match=expected):
            checkpointing.restore_data_iterator(tmp_path, current)
    (tmp_path / "process_0-of-1.json").write_text(json.dumps(_iterator().get_state()))
    with pytest.raises(ValueError, match="worker_count=0 and this run uses 2"):
        checkpointing.restore_data_iterator(tmp_path, _worker_iterator(2))
    restored = _worker_iterator(2)  # the same count restores (no worker process is started here)
    (tmp_path / "process_0-of-1.json").write_text(json.dumps(restored.get_state()))
    checkpointing.restore_data_iterator(tmp_path, restored)
