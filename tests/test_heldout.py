"""FLAN's held-out protocol: a held-out cluster never reaches a training batch, and is what gets evaluated.

Checked twice: on the task lists (the mixture's leaves) and on the actual training stream, by
building real packed batches with the loader and reading its per-task counts of consumed examples.
"""

import importlib.util
import pathlib

import pytest
from eval_fakes import CharTokenizer

from flan_jax import data
from flan_jax.data import loader


CONFIGS = pathlib.Path(__file__).resolve().parent.parent / "configs"


def _config(name, *args):
    spec = importlib.util.spec_from_file_location(f"configs_{name}", CONFIGS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


def _clusters_of(task_names):
    return {data.get_task(name).cluster for name in task_names}


def _tasks_in_training_batches(config, num_batches):
    """Names of the tasks whose examples the loader packed into the first `num_batches` batches."""
    # Any tokenizer builds the same task stream; a character tokenizer avoids training one.
    iterator = loader.make_train_iterator(config.data, CharTokenizer(), seed=config.seed)
    for _ in range(num_batches):
        next(iterator)
    counts = iterator.stats.by_task
    assert sum(c.examples for c in counts.values()) > 0
    return set(counts)


def _check_protocol(config, heldout_cluster, num_batches):
    train_tasks = data.get_mixture(config.data.train_mixture).tasks
    assert heldout_cluster not in {t.cluster for t in train_tasks}

    seen = _tasks_in_training_batches(config, num_batches)
    seen_clusters = _clusters_of(seen)
    assert heldout_cluster not in seen_clusters
    assert len(seen_clusters) >= 3, f"the stream should mix several clusters, saw {seen_clusters}"

    # ...and the held-out cluster is what the config evaluates.
    eval_tasks = [t for name in config.eval.mixtures for t in data.get_mixture(name).tasks]
    heldout_eval = [t for t in eval_tasks if t.cluster == heldout_cluster]
    assert heldout_eval, f"config.eval.mixtures {config.eval.mixtures} do not evaluate cluster {heldout_cluster!r}"
    assert not {t.name for t in heldout_eval} & {t.name for t in train_tasks}


def test_synthetic_heldout_cluster_never_in_training_batches():
    from flan_jax_tasks import synthetic_families

    config = _config("demo")
    config.data.batch_size = 16
    _check_protocol(config, synthetic_families.HELDOUT_CLUSTER, num_batches=20)
    heldout = data.get_mixture("synthetic_eval_heldout_cluster").tasks
    assert {t.cluster for t in heldout} == {synthetic_families.HELDOUT_CLUSTER}


def test_every_t0_minus_cluster_mixture_leaves_its_cluster_out():
    from flan_jax_tasks import t0_catalog

    for cluster in t0_catalog.CLUSTERS:
        tasks = data.get_mixture(f"t0_minus_{cluster}").tasks
        clusters = {t.cluster for t in tasks}
        assert cluster not in clusters
        assert clusters == set(t0_catalog.CLUSTERS) - {cluster}


def test_t0_holdout_config_training_batches_exclude_the_cluster(real_data_dir):
    heldout_cluster = "sentiment"
    config = _config("t0_holdout", heldout_cluster)
    config.data.seq_len = 512
    config.data.batch_size = 16
    try:
        _check_protocol(config, heldout_cluster, num_batches=8)
    except data.DataUnavailableError as error:
        pytest.skip(f"T0 files missing: {error}")
