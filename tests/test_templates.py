"""Templates: safe rendering, deterministic choice, options styles, few-shot and chain-of-thought."""

import collections

import pytest

from flan_jax import data
from flan_jax.data import templates


def test_render_fills_fields_and_keeps_escaped_braces():
    template = data.Template("Q: {question} {{not a field}}", "{answer}", name="t")
    assert template.render({"question": "2+2?", "answer": "4"}) == ("Q: 2+2? {not a field}", "4")
    assert template.fields == ("question", "answer")


def test_field_values_are_not_reinterpreted_as_templates():
    template = data.Template("{question}", "{answer}")
    inputs, _ = template.render({"question": "{answer.__class__} {0}", "answer": "x"})
    assert inputs == "{answer.__class__} {0}"


@pytest.mark.parametrize(
    "pattern", ["{a.b}", "{a[0]}", "{a!r}", "{a:>10}", "{}", "{0}", "{a:{b}}", "unbalanced {", "stray }"]
)
def test_unsafe_or_malformed_patterns_are_rejected_when_built(pattern):
    with pytest.raises(data.DataError, match="pattern"):
        data.Template(pattern, "{x}", name="bad")


def test_missing_field_error_names_task_template_and_field():
    task = data.Task(
        "tpl_missing", data.InMemorySource({"train": [{"question": "q"}]}), [data.Template("{question}", "{answer}", name="qa")]
    )
    with pytest.raises(data.DataError) as error:
        task.get_dataset("train")
    message = str(error.value)
    assert "tpl_missing" in message and "'qa'" in message and "'answer'" in message


def test_choose_is_deterministic_and_roughly_uniform():
    picks = [templates.choose(7, i, 5) for i in range(20_000)]
    assert picks == [templates.choose(7, i, 5) for i in range(20_000)]
    counts = collections.Counter(picks)
    assert set(counts) == set(range(5))
    assert all(abs(c / 20_000 - 0.2) < 0.02 for c in counts.values())
    assert picks != [templates.choose(8, i, 5) for i in range(20_000)]


def test_each_example_uses_one_of_the_templates_and_all_are_used():
    records = [{"x": str(i)} for i in range(200)]
    task = data.Task(
        "tpl_many", data.InMemorySource({"train": records}), [("A {x}", "{x}"), ("B {x}", "{x}"), ("C {x}", "{x}")]
    )
    examples = list(task.get_dataset("train", seed=3, shuffle=False))
    prefixes = collections.Counter(e["inputs"][0] for e in examples)
    assert set(prefixes) == {"A", "B", "C"} and min(prefixes.values()) > 30
    assert [e["inputs"] for e in task.get_dataset("train", seed=3, shuffle=False)] == [e["inputs"] for e in examples]
    assert [e["inputs"] for e in task.get_dataset("train", seed=4, shuffle=False)] != [e["inputs"] for e in examples]


@pytest.mark.parametrize(
    "style, expected",
    [
        ("flan", "OPTIONS:\n- yes\n- no"),
        ("dash", "Options:\n- yes\n- no"),
        ("letters", "Options: A) yes B) no"),
        ("parenthesized", "(A) yes\n(B) no"),
        ("inline", "Choose from: yes, no."),
        ("none", ""),
    ],
)
def test_option_styles(style, expected):
    assert data.render_options(["yes", "no"], style) == expected


def test_options_are_rendered_in_varied_styles_and_listed():
    records = [{"q": f"q{i}", "choices": ["yes", "no"], "a": "yes"} for i in range(100)]
    task = data.Task(
        "tpl_options",
        data.InMemorySource({"train": records}),
        [("{q}\n{options}", "{a}")],
        eval_templates=[("{q}", "{a}")],  # the no-options variant
        options_field="choices",
    )
    examples = list(task.get_dataset("train", seed=0))
    assert all(e["options"] == ["yes", "no"] for e in examples)
    styles_seen = {e["inputs"].split("\n", 1)[1] for e in examples}
    assert styles_seen == {data.render_options(["yes", "no"], s) for s in data.DEFAULT_OPTION_STYLES}
    plain = task.get_dataset("train", template_set="eval")[0]
    assert "yes" not in plain["inputs"] and plain["options"] == ["yes", "no"]


def test_options_field_must_hold_a_list_of_strings():
    task = data.Task(
        "tpl_bad_options", data.InMemorySource({"train": [{"q": "q", "o": "yes", "a": "a"}]}), [("{q} {options}", "{a}")],
        options_field="o",
    )
    with pytest.raises(data.DataError, match="options must be a list of str"):
        task.get_dataset("train")


def _numbers_task(name="tpl_fewshot", few_shot=None, n=50):
    source = data.InMemorySource({
        "train": [{"q": f"q{i}", "a": f"a{i}"} for i in range(n)],
        "validation": [{"q": f"v{i}", "a": f"b{i}"} for i in range(5)],
    })
    return data.Task(name, source, [("Q: {q}", "{a}")], few_shot=few_shot)


def test_few_shot_prepends_k_training_exemplars_with_the_same_template():
    task = _numbers_task(few_shot=data.FewShot(prefix="Examples:\n", target_prefix="\nA: ", example_separator="\n\n"))
    example = task.get_dataset("validation", num_shots=3, shuffle=False)[0]
    assert example["targets"] == "b0"
    assert example["inputs"].startswith("Examples:\nQ: q")
    blocks = example["inputs"][len("Examples:\n"):].split("\n\n")
    assert len(blocks) == 4 and blocks[-1] == "Q: v0"
    for block in blocks[:3]:
        question, answer = block.split("\nA: ")
        assert answer == "a" + question.removeprefix("Q: q")  # exemplar inputs and targets belong together


def test_few_shot_on_the_training_split_never_shows_the_query_itself():
    task = _numbers_task(n=4)
    for example in task.get_dataset("train", num_shots=3, seed=1):
        query = example["inputs"].split("\n\n")[-1]
        exemplars = example["inputs"].split("\n\n")[:-1]
        assert len(exemplars) == 3 and all(not e.startswith(query + "\n") for e in exemplars)


def test_few_shot_respects_the_character_budget():
    task = _numbers_task(few_shot=data.FewShot(max_chars=30))
    example = task.get_dataset("validation", num_shots=5, shuffle=False)[0]
    assert len(example["inputs"]) <= 30 and example["inputs"].endswith("Q: v0")
    assert example["inputs"].count("\n\n") == len(example["inputs"].split("\n\n")) - 1 < 5


def test_few_shot_is_deterministic_for_a_seed():
    task = _numbers_task()
    first = [e["inputs"] for e in task.get_dataset("validation", num_shots=2, seed=5)]
    assert first == [e["inputs"] for e in task.get_dataset("validation", num_shots=2, seed=5)]
    assert first != [e["inputs"] for e in task.get_dataset("validation", num_shots=2, seed=6)]


def test_few_shot_from_a_fixed_list_or_another_file(tmp_path):
    # A fixed list: the first k, in order, for every query (the fixed prompts of CoT papers), run
    # through the task's preprocessors like its own records.
    shots = [{"q": "one", "a": "1"}, {"q": "two", "a": "2"}, {"q": "three", "a": "3"}]
    upper = data.Task("tpl_fixed", _numbers_task().source, [("Q: {q}", "{a}")], preprocessors=[_upper_q],
                      few_shot=data.FewShot(exemplars=shots))
    for example in upper.get_dataset("validation", num_shots=2, seed=3):
        assert example["inputs"].startswith("Q: ONE\n1\n\nQ: TWO\n2\n\nQ: V")
    # Another file: drawn per query (seeded), never from the task's own records.
    path = tmp_path / "shots.jsonl"
    path.write_text("".join(f'{{"q": "s{i}", "a": "t{i}"}}\n' for i in range(6)))
    from_file = _numbers_task(few_shot=data.FewShot(source=data.JsonlSource({"train": path})))
    inputs = [e["inputs"] for e in from_file.get_dataset("train", num_shots=2, seed=0)]
    assert all(block.startswith("Q: s") for text in inputs for block in text.split("\n\n")[:-1])
    assert len({text.split("\n\n")[0] for text in inputs}) > 1  # drawn, not fixed
    only_eval = data.Task("tpl_no_train", data.InMemorySource({"test": [{"q": "x", "a": "y"}]}), [("Q: {q}", "{a}")])
    with pytest.raises(data.DataError, match=r"split 'train' \(FewShot.split\), which this task lacks"):
        only_eval.get_dataset("test", num_shots=1)
    with pytest.raises(data.DataError, match="not both"):
        data.FewShot(source=data.JsonlSource({"train": path}), exemplars=shots)
    with pytest.raises(data.DataError, match="has no split 'dev'"):
        _numbers_task(few_shot=data.FewShot(source=data.JsonlSource({"train": path}), split="dev")).get_dataset(
            "validation", num_shots=1)
    # A bad exemplar is located in its own file.
    path.write_text('{"q": "s0", "a": "t0"}\n{"q": "s1"}\n')
    with pytest.raises(data.DataError) as error:
        data.register_task(_numbers_task(name="tpl_bad_shot", few_shot=data.FewShot(source=data.JsonlSource({"train": path}))))
    assert error.value.file == str(path) and error.value.line == 2 and error.value.field == "a"


def _upper_q(record):
    return {**record, "q": record["q"].upper()}


def test_evaluation_records_need_not_carry_training_only_fields():
    """With a references_field, an eval split without the rationale renders (targets None), training does not."""
    source = data.InMemorySource({
        "train": [{"q": "2+2", "r": "Two and two.", "a": "4"}],
        "test": [{"q": "3+3", "a": "6"}],  # no rationale
    })
    task = data.Task("tpl_eval_only", source, data.cot_templates(["{q}"], targets="{r} So the answer is {a}."),
                     references_field="a")
    example = task.get_dataset("test", template_set="eval")[0]
    assert example["targets"] is None and example["references"] == ["6"]
    assert task.get_dataset("train", template_set="eval")[0]["targets"] == "Two and two. So the answer is 4."
    with pytest.raises(data.DataError, match="field 'r'"):
        task.get_dataset("test")  # training renders targets
    with pytest.raises(data.DataError, match="field 'r'"):
        task.replace(name="tpl_eval_only_refs", references_field=None).get_dataset("test", template_set="eval")
    with pytest.raises(data.DataError, match="metric 'loss' scores the targets"):
        data.register_task(task.replace(name="tpl_eval_only_loss", metrics=("exact_match", "loss")))


def test_chain_of_thought_templates():
    cot = data.cot_templates(["Q: {question}", "{question}"])
    direct = data.answer_only_templates(["Q: {question}"])
    record = {"question": "Is 3 odd?", "rationale": "3 = 2*1 + 1.", "answer": "yes"}
    inputs, targets = cot[0].render(record)
    assert inputs == "Q: Is 3 odd?\n" + data.COT_TRIGGERS[0]
    assert targets == "3 = 2*1 + 1. So the answer is yes."
    assert cot[1].render(record)[0].endswith(data.COT_TRIGGERS[1])
    assert direct[0].render(record) == ("Q: Is 3 odd?", "yes")


def test_templates_given_as_pairs_get_names_and_duplicates_are_rejected():
    task = data.Task("tpl_names", data.InMemorySource({"train": [{"x": "1"}]}), [("{x}", "{x}"), ("{x}!", "{x}")])
    assert [t.name for t in task.templates] == ["t0", "t1"]
    with pytest.raises(data.DataError, match="duplicate template names"):
        data.Task("tpl_dup", task.source, [data.Template("{x}", "{x}", "a"), data.Template("{x}.", "{x}", "a")])
