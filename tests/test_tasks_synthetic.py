"""The built-in synthetic FLAN-style mixture: the properties the demo's claims rest on."""

from __future__ import annotations

import collections
import random
import re

import pytest

from flan_jax_tasks import synthetic_families as families


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
        missing = (_placeholders(inputs) | _placeholders(targets)) - set(fields)
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


# ----------------------------------------------------------------------------- registered tasks and mixtures
from flan_jax import data  # noqa: E402
from flan_jax_tasks import synthetic  # noqa: E402


def _clusters(mixture_name: str) -> set[str]:
    return {task.cluster for task in data.get_mixture(mixture_name).tasks}


def test_registered_mixtures_split_seen_and_heldout_clusters():
    train = data.get_mixture("synthetic_train")
    assert len(train.tasks) >= 12 and len(_clusters("synthetic_train")) >= 4
    assert families.HELDOUT_CLUSTER not in _clusters("synthetic_train")
    assert _clusters("synthetic_eval_heldout_cluster") == {families.HELDOUT_CLUSTER}
    heldout_templates = data.get_mixture("synthetic_eval_seen_heldout_templates").tasks
    assert sorted(t.name for t in heldout_templates) == sorted(
        t.name + synthetic.HELDOUT_TEMPLATES_SUFFIX for t in train.tasks)
    assert set(train.rates()) == {t.name for t in train.tasks}


def test_heldout_template_tasks_never_render_a_training_template():
    for task in data.get_mixture("synthetic_eval_seen_heldout_templates").tasks:
        base = data.get_task(task.name.removesuffix(synthetic.HELDOUT_TEMPLATES_SUFFIX))
        train_inputs = {t.inputs for t in base.templates}
        assert {t.inputs for t in task.eval_templates} == {t.inputs for t in task.templates}
        assert not {t.inputs for t in task.templates} & train_inputs
        assert len(base.templates) >= 5 and len(task.templates) == 2


def test_rendered_examples_follow_the_contract_and_splits_are_disjoint():
    task = data.get_task("synthetic.sentiment")
    validation = task.get_dataset("validation", shuffle=False, template_set="eval")
    train = task.get_dataset("train", shuffle=False)
    assert len(validation) == synthetic.NUM_VALIDATION and len(train) == synthetic.NUM_TRAIN
    example = validation[0]
    assert set(example) == {"inputs", "targets", "task", "references", "options", "template"}
    assert example["task"] == "synthetic.sentiment"
    assert example["template"] in [t.name for t in task.eval_templates]
    assert example["options"] == ["positive", "negative"] and example["targets"] in example["options"]
    assert example["references"] == [example["targets"]]
    train_texts = {r["text"] for r in task.records("train")}
    assert not train_texts & {r["text"] for r in task.records("validation")}
    # Deterministic: the same stream twice.
    mixed = data.get_mixture("synthetic_train").get_dataset("train", seed=3)
    again = data.get_mixture("synthetic_train").get_dataset("train", seed=3)
    assert [mixed[i] for i in range(50)] == [again[i] for i in range(50)]
    assert len({mixed[i]["task"] for i in range(200)}) >= 12
