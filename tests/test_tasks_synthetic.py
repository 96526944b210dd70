"""The built-in synthetic FLAN-style mixture: the properties the demo's claims rest on."""

from __future__ import annotations

import collections
import random
import re

import pytest

from tasks import synthetic_families as families


def _placeholders(template: str) -> set[str]:
    return set(re.findall(r"{(\w+)}", template))


def test_family_and_cluster_counts():
    clusters = collections.Counter(f.cluster for f in families.FAMILIES)
    assert len(families.FAMILIES) >= 12
    assert len(clusters) >= 4
    seen_clusters = {c for c in clusters if c != families.HELDOUT_CLUSTER}
    assert families.HELDOUT_CLUSTER in clusters and len(seen_clusters) >= 4
    assert sum(clusters[c] for c in seen_clusters) >= 12
    assert len({f.name for f in families.FAMILIES}) == len(families.FAMILIES)


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_templates_are_many_distinct_and_fill_from_the_fields(family):
    assert len(family.train_templates) >= 5
    assert len(family.heldout_templates) == 2
    train_inputs = {inputs for inputs, _ in family.train_templates}
    heldout_inputs = {inputs for inputs, _ in family.heldout_templates}
    assert len(train_inputs) == len(family.train_templates)
    assert not train_inputs & heldout_inputs, "a held-out template is also used in training"
    fields = family.generate(random.Random(0))
    for inputs, targets in family.train_templates + family.heldout_templates:
        missing = (_placeholders(inputs) | _placeholders(targets)) - set(fields) - {"options_"}
        assert not missing, f"{family.name}: template {inputs!r} uses fields the generator lacks: {missing}"
        assert "{answer}" in targets


@pytest.mark.parametrize("family", families.FAMILIES, ids=lambda f: f.name)
def test_examples_are_deterministic_disjoint_and_short(family):
    splits = families.generate_splits(family, num_train=2000, num_validation=100, seed=0)
    again = families.generate_splits(family, num_train=2000, num_validation=100, seed=0)
    assert splits == again
    assert len(splits["validation"]) == 100
    assert len(splits["train"]) >= 800

    def key(fields):
        return repr(sorted((k, v) for k, v in fields.items() if k != "answer"))

    train_keys = {key(f) for f in splits["train"]}
    assert len(train_keys) == len(splits["train"]), "duplicate examples in train"
    assert not train_keys & {key(f) for f in splits["validation"]}, "validation example also in train"
    for fields in splits["train"][:200]:
        assert 1 <= len(str(fields["answer"]).split()) <= 5
        if "options" in fields:
            assert fields["answer"] in fields["options"]
    assert families.generate_splits(family, 50, 10, seed=1) != families.generate_splits(family, 50, 10, seed=0)


@pytest.mark.parametrize("n, words", [(0, "zero"), (7, "seven"), (13, "thirteen"), (40, "forty"),
                                      (42, "forty two"), (100, "one hundred"), (305, "three hundred five"),
                                      (999, "nine hundred ninety nine")])
def test_number_to_words(n, words):
    assert families.number_to_words(n) == words


def test_classification_families_have_options():
    with_options = [f for f in families.FAMILIES if f.has_options]
    assert len(with_options) >= 3
    for family in with_options:
        assert "options" in family.generate(random.Random(1))
