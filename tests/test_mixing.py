"""Mixing: explicit, nested, examples-proportional (cap, temperature) rates and the mixed stream."""

import collections
import logging
import sys

import pytest

from flan_jax import data
from flan_jax.data import mixing


@pytest.fixture(autouse=True)
def _isolated_registry(clean_registry):
    """Every test here registers into a throwaway registry (conftest.clean_registry)."""


def _task(name, n, split="train"):
    records = [{"x": f"{name}-{i}"} for i in range(n)]
    return data.register_task(data.Task(name, data.InMemorySource({split: records}), [("{x}", "{x}"), ("say {x}", "{x}")]))


def test_normalise_and_proportional_rates_formula():
    assert mixing.normalise({"a": 1, "b": 3, "c": 0}) == {"a": 0.25, "b": 0.75}
    with pytest.raises(data.DataError, match=">= 0"):
        mixing.normalise({"a": -1, "b": 2})
    with pytest.raises(data.DataError, match="zero"):
        mixing.normalise({"a": 0})
    counts = {"big": 10_000, "mid": 400, "small": 100, "none": 0}
    assert data.proportional_rates(counts) == pytest.approx({"big": 10_000 / 10_500, "mid": 400 / 10_500, "small": 100 / 10_500})
    capped = data.proportional_rates(counts, cap=1_000)
    assert capped == pytest.approx({"big": 1_000 / 1_500, "mid": 400 / 1_500, "small": 100 / 1_500})
    warm = data.proportional_rates(counts, cap=1_000, temperature=2.0)
    roots = {"big": 1_000**0.5, "mid": 400**0.5, "small": 100**0.5}
    assert warm == pytest.approx({k: v / sum(roots.values()) for k, v in roots.items()})
    with pytest.raises(ValueError):
        data.proportional_rates(counts, temperature=0)


def test_explicit_rates_are_normalised():
    _task("mix_a", 10), _task("mix_b", 10)
    assert data.Mixture("m", [("mix_a", 1), ("mix_b", 3)]).rates() == {"mix_a": 0.25, "mix_b": 0.75}


def test_nested_mixtures_flatten_and_multiply_rates():
    _task("mix_a", 10), _task("mix_b", 10), _task("mix_c", 10)
    data.register_mixture(data.Mixture("mix_inner", [("mix_a", 1), ("mix_b", 3)]))
    outer = data.Mixture("mix_outer", [("mix_inner", 2), ("mix_c", 2), ("mix_a", 1)])
    assert outer.rates() == pytest.approx({"mix_a": (0.5 + 1) / 5, "mix_b": 1.5 / 5, "mix_c": 2 / 5})
    assert sorted(t.name for t in outer.tasks) == ["mix_a", "mix_b", "mix_c"]


def test_proportional_mixture_with_cap_temperature_and_nested_names(caplog):
    _task("mix_big", 900), _task("mix_small", 100), _task("mix_empty", 0), _task("mix_evalonly", 5, split="test")
    data.register_mixture(data.Mixture("mix_group", [("mix_small", 1), ("mix_empty", 1)]))
    mixture = data.Mixture.proportional("mix_prop", ["mix_big", "mix_group", "mix_evalonly"], cap=400, temperature=2.0)
    with caplog.at_level(logging.WARNING):
        rates = mixture.rates()
    expected = {"mix_big": 400**0.5, "mix_small": 100**0.5}
    assert rates == pytest.approx({k: v / sum(expected.values()) for k, v in expected.items()})
    assert "mix_empty" in caplog.text and "mix_evalonly" in caplog.text  # left out, and said so
    assert len(mixture.tasks) == 4


def test_mixture_errors():
    _task("mix_a", 3)
    with pytest.raises(data.DataError, match="no members"):
        data.Mixture("m", [])
    with pytest.raises(data.DataError, match="must be >= 0"):
        data.Mixture("m", [("mix_a", -1)])
    data.register_mixture(data.Mixture("mix_loop1", [("mix_loop2", 1)]))
    data.register_mixture(data.Mixture("mix_loop2", [("mix_loop1", 1)]))
    with pytest.raises(data.DataError, match="cycle"):
        data.get("mix_loop1").rates()
    with pytest.raises(data.UnknownNameError):
        data.Mixture("m", [("mix_typo", 1)]).rates()
    empty = data.register_task(data.Task("mix_void", data.InMemorySource({"train": []}), [("{x}", "{x}")]))
    with pytest.raises(data.DataError, match="no examples"):
        data.Mixture("m", [(empty, 1), ("mix_a", 1)]).get_dataset("train")


def test_stream_is_infinite_deterministic_and_matches_the_rates():
    _task("mix_a", 50), _task("mix_b", 7), _task("mix_c", 300)
    mixture = data.Mixture("mix_abc", [("mix_a", 0.5), ("mix_b", 0.2), ("mix_c", 0.3)])
    stream = mixture.get_dataset("train", seed=3)
    assert len(stream) >= sys.maxsize // 2
    sample = [stream[i] for i in range(20_000)]
    counts = collections.Counter(e["task"] for e in sample)
    for name, rate in mixture.rates().items():
        assert abs(counts[name] / len(sample) - rate) < 0.01, (name, counts)
    again = mixture.get_dataset("train", seed=3)
    assert [again[i] for i in range(0, 20_000, 97)] == sample[::97]
    other = mixture.get_dataset("train", seed=4)
    assert [other[i]["inputs"] for i in range(200)] != [e["inputs"] for e in sample[:200]]
    assert stream[10**15]["task"] in {"mix_a", "mix_b", "mix_c"}


def test_each_task_epoch_in_the_stream_has_no_repeats_and_epochs_are_reshuffled():
    _task("mix_a", 40), _task("mix_small", 6)
    stream = data.Mixture("m", [("mix_a", 1), ("mix_small", 1)]).get_dataset("train", seed=0)
    small = [e["targets"] for e in (stream[i] for i in range(200)) if e["task"] == "mix_small"][:36]
    epochs = [small[i : i + 6] for i in range(0, 36, 6)]
    assert all(sorted(epoch) == [f"mix_small-{i}" for i in range(6)] for epoch in epochs)
    assert len({tuple(epoch) for epoch in epochs}) > 1


def test_stream_iterator_state_restores_exactly():
    _task("mix_a", 30), _task("mix_b", 20)
    stream = data.Mixture("m", [("mix_a", 2), ("mix_b", 1)]).get_dataset("train", seed=1).to_iter_dataset()
    iterator = iter(stream)
    for _ in range(17):
        next(iterator)
    state = iterator.get_state()
    expected = [next(iterator) for _ in range(10)]
    resumed = iter(stream)
    resumed.set_state(state)
    assert [next(resumed) for _ in range(10)] == expected


def test_describe_lists_rates_largest_first():
    text = mixing.describe({"a": 0.25, "b": 0.75}, {"a": 10, "b": 30})
    assert text.splitlines()[0].strip().startswith("75.0000%") and "b" in text.splitlines()[0]
    assert mixing.stable_seed(0, "a") == mixing.stable_seed(0, "a") != mixing.stable_seed(1, "a")
