"""Checkpoint checksums: written after Orbax finalises a save (async too), verified on every restore."""

import errno
import json
import os

import jax
import numpy as np
import pytest
from flax import nnx

from flan_jax.train import checkpointing, exit_codes, integrity, optimizer, partitioning, state as state_lib
from tests import train_fakes


def _iterator():
    import grain

    return iter(grain.MapDataset.range(1000).map(lambda i: {"x": np.full((2,), i)}).to_iter_dataset())


def _parts(config):
    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:1])
    parts = state_lib.ModelParts(lambda: train_fakes.TinyLM(rngs=nnx.Rngs(0)), mesh, partitioning.axis_rules(config.mesh))
    tx, _ = optimizer.make_optimizer(config.optimizer, 10)
    return mesh, parts, tx, state_lib.state_shardings(parts, tx, mesh)


def _save(workdir, steps, *, async_save=True):
    """Checkpoints of distinct states (params scaled by the step) at `steps`; returns the abstract state."""
    config = train_fakes.tiny_config()
    config.checkpoint.async_save = async_save
    mesh, parts, tx, shardings = _parts(config)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    ckpt = checkpointing.Checkpointer(workdir, config.checkpoint)
    it = _iterator()
    for s in steps:
        next(it)
        ckpt.save(s, state.replace(params=jax.tree.map(lambda p: p * s, state.params)), it, config)
    ckpt.close()
    return config, state_lib.abstract_state(parts, tx, shardings, seed=0)


def _flip_a_bit(directory):
    """Flips the lowest bit of a byte in the middle of the largest file (array data) of `directory`."""
    files = [os.path.join(root, n) for root, _, names in os.walk(directory) for n in names]
    largest = max(files, key=os.path.getsize)
    with open(largest, "r+b") as f:
        f.seek(os.path.getsize(largest) // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 1]))
    return largest


def test_every_file_of_every_async_save_is_checksummed(tmp_path):
    _save(tmp_path, [1, 2, 3])
    for s in (2, 3):  # keep=3 by default: all kept
        directory = tmp_path / "checkpoints" / str(s)
        manifest = json.loads((directory / integrity.MANIFEST).read_text())
        on_disk = sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file() and p.name != integrity.MANIFEST)
        assert sorted(manifest["files"]) == on_disk and any(name.startswith("params/") for name in on_disk)
        assert any(name.startswith("data_iter/") for name in on_disk) and any(name.startswith("opt_state/") for name in on_disk)
        assert integrity.verify(directory) == "verified"


def test_a_flipped_bit_is_caught_the_checkpoint_moved_aside_and_the_previous_one_restored(tmp_path, caplog):
    config, abstract = _save(tmp_path, [2, 4])
    flipped = _flip_a_bit(tmp_path / "checkpoints" / "4" / "params")
    with caplog.at_level("WARNING"):
        restored = checkpointing.Checkpointer(tmp_path, config.checkpoint).restore_latest(abstract, _iterator())
    assert "checksum mismatch" in caplog.text and os.path.relpath(flipped, tmp_path / "checkpoints" / "4") in caplog.text
    mesh, parts, tx, shardings = _parts(config)
    step_2_params = jax.tree.map(lambda p: np.asarray(p) * 2, state_lib.init_state(parts, tx, shardings, 0, mesh).params)
    jax.tree.map(np.testing.assert_array_equal, jax.tree.map(np.asarray, restored.params), step_2_params)
    assert not (tmp_path / "checkpoints" / "4").exists()
    (moved,) = (tmp_path / "checkpoints_corrupt").iterdir()
    assert moved.name.startswith("4-")


def test_without_checksums_the_same_flip_restores_silently(tmp_path):
    """Why the checksums exist: Orbax alone restores the flipped bit as a changed parameter."""
    config, abstract = _save(tmp_path, [4])
    clean = checkpointing.Checkpointer(tmp_path, config.checkpoint).restore_latest(abstract, _iterator())
    clean = jax.tree.map(np.asarray, clean.params)
    _flip_a_bit(tmp_path / "checkpoints" / "4" / "params")
    (tmp_path / "checkpoints" / "4" / integrity.MANIFEST).unlink()  # as a checkpoint of an older flan_jax
    restored = checkpointing.Checkpointer(tmp_path, config.checkpoint).restore_latest(abstract, _iterator())
    changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(jax.tree.leaves(clean), jax.tree.leaves(restored.params))]
    assert sum(changed) == 1


def test_when_every_checkpoint_is_corrupt_nothing_is_moved_and_the_error_says_so(tmp_path):
    config, abstract = _save(tmp_path, [2, 4])
    for s in (2, 4):
        _flip_a_bit(tmp_path / "checkpoints" / str(s) / "params")
    with pytest.raises(exit_codes.NoUsableCheckpointError, match="(?s)step 4: ChecksumMismatchError.*step 2:.*Every one fails its checksums"):
        checkpointing.Checkpointer(tmp_path, config.checkpoint).restore_latest(abstract, _iterator())
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["2", "4"]
    assert exit_codes.exit_code_for(exit_codes.NoUsableCheckpointError("x")) == exit_codes.ExitCode.NO_USABLE_CHECKPOINT


def test_the_last_good_checkpoint_is_the_newest_that_verifies(tmp_path):
    config, _ = _save(tmp_path, [2, 4, 6])
    _flip_a_bit(tmp_path / "checkpoints" / "6" / "opt_state")
    (tmp_path / "checkpoints" / "4" / integrity.MANIFEST).unlink()  # unverified: never called "good"
    assert checkpointing.Checkpointer(tmp_path, config.checkpoint).last_verified_step() == 2
    with pytest.raises(integrity.ChecksumMismatchError, match="opt_state/"):
        integrity.verify(tmp_path / "checkpoints" / "6")


def test_a_failed_async_save_is_reported_at_the_next_poll(tmp_path, monkeypatch):
    """Orbax's background finalize fails (disk full at the rename): poll() raises, classified as disk full."""
    from orbax.checkpoint._src.path import async_path

    async def no_space(src, dst):
        raise OSError(errno.ENOSPC, "No space left on device", str(dst))

    config = train_fakes.tiny_config()
    mesh, parts, tx, shardings = _parts(config)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    ckpt = checkpointing.Checkpointer(tmp_path, config.checkpoint)
    monkeypatch.setattr(async_path, "rename", no_space)
    ckpt.save(2, state, _iterator(), config)
    while ckpt.manager.is_saving_in_progress():
        pass
    with pytest.raises(exit_codes.CheckpointSaveError, match="step 2") as error:
        ckpt.poll()
    assert exit_codes.exit_code_for(error.value) == exit_codes.ExitCode.DISK_FULL
    monkeypatch.undo()
    ckpt.close()
