"""Task and registry: rendered-example contract, preprocessors, determinism, epochs, lookup by name."""

import logging
import pickle
import sys

import pytest

from flan_jax import data, default_config
from flan_jax.data import registry


def _task(name="reg_task", n=20, **kwargs):
    source = data.InMemorySource({
        "train": [{"q": f"q{i}", "a": f"a{i}"} for i in range(n)],
        "validation": [{"q": f"v{i}", "a": f"b{i}"} for i in range(3)],
    })
    kwargs.setdefault("templates", [("Q: {q}", "{a}"), ("Question: {q}", "{a}")])
    return data.Task(name, source, kwargs.pop("templates"), **kwargs)


def test_rendered_examples_follow_the_design_contract():
    example = _task().get_dataset("validation", shuffle=False)[0]
    assert set(example) == {"inputs", "targets", "task", "references", "options", "template"}
    assert (example["template"], example["inputs"]) in (("t0", "Q: v0"), ("t1", "Question: v0"))
    assert example["targets"] == "b0" and example["task"] == "reg_task"
    assert example["references"] == ["b0"] and example["options"] == []


def test_task_metadata():
    task = _task(metrics=("exact_match", "rouge"), cluster="qa", description="toy")
    assert task.splits == ("train", "validation")
    assert task.num_examples("train") == 20 and task.metrics == ("exact_match", "rouge") and task.cluster == "qa"
    with pytest.raises(data.DataError, match="task 'reg_task'.*no split 'test'; available: train, validation"):
        task.get_dataset("test")


def test_references_field_gives_several_acceptable_answers():
    source = data.InMemorySource({"test": [{"q": "x", "a": "4", "refs": ["4", "four"]}, {"q": "y", "a": "1", "refs": "one"}]})
    task = data.Task("reg_refs", source, [("{q}", "{a}")], references_field="refs")
    examples = list(task.get_dataset("test", shuffle=False))
    assert [e["references"] for e in examples] == [["4", "four"], ["one"]]


def test_same_seed_same_stream_other_seed_other_order():
    task = _task()
    first = [e["inputs"] for e in task.get_dataset("train", seed=1)]
    assert first == [e["inputs"] for e in task.get_dataset("train", seed=1)]
    assert first != [e["inputs"] for e in task.get_dataset("train", seed=2)]
    assert sorted(e["targets"] for e in task.get_dataset("train", seed=1)) == sorted(f"a{i}" for i in range(20))


def test_unshuffled_split_keeps_file_order():
    assert [e["targets"] for e in _task().get_dataset("train", shuffle=False)] == [f"a{i}" for i in range(20)]


def test_epochs_are_reshuffled_without_repeats_inside_an_epoch():
    task = _task(n=30)
    ds = task.get_dataset("train", seed=0, num_epochs=3)
    assert len(ds) == 90
    epochs = [[ds[e * 30 + i]["targets"] for i in range(30)] for e in range(3)]
    assert all(sorted(epoch) == sorted(f"a{i}" for i in range(30)) for epoch in epochs)
    assert epochs[0] != epochs[1] != epochs[2]
    forever = task.get_dataset("train", seed=0, num_epochs=None)
    assert [forever[i]["targets"] for i in range(90)] == [t for epoch in epochs for t in epoch]
    assert forever[10**12]["task"] == "reg_task"


def test_eval_template_set_uses_held_out_templates():
    task = _task(eval_templates=[("Held out: {q}", "{a}")])
    assert all(e["inputs"].startswith("Held out") for e in task.get_dataset("validation", template_set="eval"))
    assert not any(e["inputs"].startswith("Held out") for e in task.get_dataset("validation"))
    with pytest.raises(ValueError, match="template_set"):
        task.get_dataset("validation", template_set="test")


def test_preprocessors_transform_and_filter_with_a_logged_count(caplog):
    def upper(record):
        record["q"] = record["q"].upper()
        return record

    def drop_even(record):
        return None if int(record["a"][1:]) % 2 == 0 else record

    task = _task(preprocessors=[upper, drop_even])
    with caplog.at_level(logging.WARNING):
        examples = list(task.get_dataset("train", shuffle=False))
    assert [e["targets"] for e in examples] == [f"a{i}" for i in range(1, 20, 2)]
    assert examples[0]["inputs"].endswith("Q1")
    assert task.filtered["train"] == 10 and task.num_examples("train") == 10
    assert "dropped 10 of 20" in caplog.text
    assert task.source.records("train")[0]["q"] == "q0"  # the source's cached records are untouched


def test_failing_preprocessor_error_names_task_and_record():
    def explode(record):
        if record["a"] == "a3":
            raise KeyError("nothing")
        return record

    with pytest.raises(data.DataError, match=r"task 'reg_task'.*record 3.*explode"):
        _task(preprocessors=[explode]).num_examples("train")


def test_replace_makes_a_variant_and_validates_arguments():
    task = _task()
    variant = task.replace(name="reg_task_heldout", templates=[("Other: {q}", "{a}")])
    assert variant.name == "reg_task_heldout" and variant.source is task.source
    assert variant.get_dataset("validation")[0]["inputs"].startswith("Other")
    assert variant.eval_templates == variant.templates
    assert task.get_dataset("validation", shuffle=False)[0]["inputs"] in ("Q: v0", "Question: v0")
    with pytest.raises(TypeError, match="unknown argument"):
        task.replace(nmae="x")


def test_invalid_task_definitions_are_rejected():
    with pytest.raises(data.DataError, match="invalid task name"):
        _task(name="has space")
    with pytest.raises(TypeError, match="Source"):
        data.Task("reg_bad", [{"q": 1}], [("{q}", "{q}")])
    with pytest.raises(data.DataError, match="option_styles"):
        _task(option_styles=("fancy",))


def test_empty_split_gives_an_empty_dataset_but_cannot_be_repeated():
    source = data.InMemorySource({"train": []})
    task = data.Task("reg_empty", source, [("{q}", "{a}")])
    assert len(task.get_dataset("train")) == 0
    with pytest.raises(data.DataError, match="no examples"):
        task.get_dataset("train", num_epochs=None)


def test_rendered_dataset_pickles_for_grain_workers():
    ds = _task().get_dataset("train", seed=4)
    clone = pickle.loads(pickle.dumps(ds))
    assert [clone[i] for i in range(5)] == [ds[i] for i in range(5)]


def test_register_get_duplicate_and_replace(clean_registry):
    task = data.register_task(_task(name="reg_a"))
    assert data.get("reg_a") is task and data.get_task("reg_a") is task
    data.register_task(task)  # registering the same object again is harmless
    with pytest.raises(data.DataError, match="already registered.*replace=True"):
        data.register_task(_task(name="reg_a"))
    other = data.register_task(_task(name="reg_a"), replace=True)
    assert data.get("reg_a") is other
    mixture = data.register_mixture(data.Mixture("reg_mix", [("reg_a", 1.0)]))
    assert data.get("reg_mix") is mixture and "reg_mix" in data.list_names("mixture")
    assert "reg_a" in data.list_names("task") and "reg_a" not in data.list_names("mixture")
    with pytest.raises(data.DataError, match="not a Task"):
        data.get_task("reg_mix")
    assert data.get_mixture("reg_a").rates() == {"reg_a": 1.0}


def test_unknown_name_lists_close_matches(clean_registry):
    data.register_task(_task(name="reg_squad_v2"))
    with pytest.raises(data.UnknownNameError, match="did you mean reg_squad_v2"):
        data.get("reg_sqaud_v2")
    with pytest.raises(LookupError):
        data.get("reg_nothing_like_it_at_all")


def test_the_registry_imports_no_task_package_itself(clean_registry, monkeypatch):
    """Built-in tasks come from config.data.task_modules (default: flan_jax_tasks), not a hidden import."""
    calls = []
    monkeypatch.setattr(registry.importlib, "import_module", lambda name: calls.append(name))
    monkeypatch.delitem(sys.modules, registry.BUILTIN_TASK_MODULE, raising=False)
    saved = dict(registry._REGISTRY)
    registry._REGISTRY.clear()
    with pytest.raises(data.UnknownNameError, match=r"data.import_task_modules\(\['flan_jax_tasks'\]\)"):
        data.get("synthetic_train")
    assert data.list_names() == [] and calls == []
    monkeypatch.undo()
    registry._REGISTRY.update(saved)  # (the package may already be imported: importing it again is a no-op)
    assert default_config.get_config().data.task_modules == (registry.BUILTIN_TASK_MODULE,)
    data.import_task_modules(default_config.get_config().data.task_modules)
    assert isinstance(data.get("synthetic_train"), data.Mixture)


def test_docs_tasks_md_examples_run(clean_registry, tmp_path, monkeypatch):
    """The code in docs/tasks.md is what users copy: run it against a small data folder."""
    import json
    import pathlib
    import re

    text = (pathlib.Path(__file__).parent.parent / "docs" / "tasks.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert len(blocks) >= 4
    qa = tmp_path / "my_qa"
    qa.mkdir()
    for name in ("train", "dev"):
        (qa / f"{name}.jsonl").write_text(json.dumps({"q": "Who wrote Hamlet?", "a": "Shakespeare"}) + "\n")
    sciq = tmp_path / "sciq"  # the walkthrough's benchmark: letter answers, a separate file of CoT exemplars
    sciq.mkdir()
    (sciq / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": "Which is a gas?", "choices": ["ice", "steam", "rock"], "answer": "B"},
        {"question": "Which is a metal?", "choices": ["wood", "iron", "glass"], "answer": "B"},
    ]))
    (sciq / "cot_shots.jsonl").write_text("".join(json.dumps(r) + "\n" for r in [
        {"question": f"Shot {i}?", "choices": ["x", "y"], "answer": "A", "rationale": f"Reason {i}."} for i in range(4)
    ]))
    monkeypatch.setenv("FLAN_JAX_DATA_DIR", str(tmp_path))
    namespace: dict = {}
    try:
        for block in blocks:
            exec(compile(block, "docs/tasks.md", "exec"), namespace)
    finally:
        for name in ("contains_answer", "answer_words", "year_match"):
            data.unregister_metric(name)
    example = namespace["ds"][0]
    assert example["task"] == "my_qa" and example["targets"] == "Shakespeare"
    assert example["inputs"] in ("Question: Who wrote Hamlet?\nAnswer:", "Who wrote Hamlet?\n\nGive a short answer.")
    assert {"my_qa", "cot_creak", "qa_mix", "everything", "flan_like", "my_lab.sciq_all"} <= set(registry._REGISTRY)
    # The walkthrough's CoT task: 3 fixed exemplars in file order, then the query; "(B)" reads back as option B.
    cot = data.get_task("my_lab.sciq_cot")
    query = cot.get_dataset("validation", shuffle=False, template_set="eval", num_shots=3)[0]
    assert query["targets"] is None and query["references"] == ["steam"]
    assert [line for line in query["inputs"].split("\n") if line.startswith("Question")] == [
        "Question: Shot 0?", "Question: Shot 1?", "Question: Shot 2?", "Question: Which is a gas?"]
    assert "Reason 0. So the answer is (A)." in query["inputs"]
    assert cot.score("Steam is a gas. So the answer is (B).", query) == {"exact_match": 1.0}
    assert cot.score("So the answer is (C).", query) == {"exact_match": 0.0}


def test_errors_after_loading_point_at_the_file_line(tmp_path):
    """Preprocessor and template errors name the file and line the bad record came from."""
    path = tmp_path / "qa.jsonl"
    path.write_text('{"q": "a", "a": "1"}\n\n{"q": "b", "a": 2}\n{"q": "c"}\n')

    def needs_str_answer(record):
        if not isinstance(record["a"], str):
            raise data.DataError("expected a string", field="a")
        return record

    source = data.JsonlSource({"train": path})
    with pytest.raises(data.DataError) as error:
        data.Task("reg_pre", source, [("{q}", "{a}")], preprocessors=[needs_str_answer]).num_examples("train")
    assert "qa.jsonl:3, record 1, field 'a'" in str(error.value) and "needs_str_answer" in str(error.value)

    drop_b = data.Task("reg_tpl", source, [("{q}", "{a}")], preprocessors=[lambda r: None if r["q"] == "b" else r])
    with pytest.raises(data.DataError) as error:  # the last record is in the sample get_dataset renders first
        drop_b.get_dataset("train", shuffle=False)
    assert error.value.line == 4 and error.value.field == "a" and error.value.task == "reg_tpl"

    # A bad record outside that sample fails when it is rendered, located the same way.
    long = tmp_path / "long.jsonl"
    long.write_text("".join('{"q": "x"}\n' if i == 1 else f'{{"q": "q{i}", "a": "{i}"}}\n' for i in range(40)))
    ds = data.Task("reg_tpl_long", data.JsonlSource({"train": long}), [("{q}", "{a}")]).get_dataset("train", shuffle=False)
    assert ds[0]["targets"] == "0"
    with pytest.raises(data.DataError) as error:
        ds[1]
    assert error.value.line == 2 and error.value.field == "a" and error.value.task == "reg_tpl_long"
