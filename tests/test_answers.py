"""Answer extraction: what each extractor reads from a generation, options mapping, and how tasks apply it."""

import pickle

import pytest

from flan_jax import data


@pytest.mark.parametrize(
    "text, expected",
    [
        ("Grass is green. So the answer is green.", "green"),
        ("So the answer is (B).", "(B)"),
        ("3 + 4 = 7. So THE ANSWER IS 7.", "7"),  # case-insensitive marker
        ("The answer is 2. Wait, so the answer is 6.", "6"),  # the last marker wins
        ("So the answer is yes. Because rain is wet.", "yes"),  # a sentence end stops it
        ("So the answer is 3.5.", "3.5"),  # a decimal point is not a sentence end
        ("So the answer is: Paris\nNext question", "Paris"),  # a newline stops it; ':' removed
        ("Paris", "Paris"),  # no marker: the whole text (a direct answer)
        ("  the answer is  ", ""),
    ],
)
def test_answer_after_reads_the_flan_cot_answer(text, expected):
    assert data.AnswerAfter()(text) == expected


def test_answer_after_other_markers_and_missing():
    assert data.AnswerAfter("####")("48 / 2 = 24\n#### 72") == "72"
    assert data.AnswerAfter("Final:", "Answer:")("Answer: 4 ... Final: 5") == "5"  # last of any marker
    assert data.AnswerAfter(missing="empty")("no marker here") == ""
    with pytest.raises(ValueError, match="missing"):
        data.AnswerAfter(missing="guess")


def test_answer_regex_and_function():
    assert data.AnswerRegex(r"\[(\w+)\]")("first [a] then [b]") == "b"
    assert data.AnswerRegex(r"\[(\w+)\]", occurrence="first")("first [a] then [b]") == "a"
    assert data.AnswerRegex(r"\d+")("x 12 y 34") == "34"  # no group: the whole match
    assert data.AnswerRegex(r"\[(\w+)\]", missing="empty")("none") == ""
    with pytest.raises(ValueError, match="pattern"):
        data.AnswerRegex("(")

    assert data.AnswerFunction(str.upper)("yes") == "YES"  # text only
    assert data.AnswerFunction(lambda text, example: example["options"][0])("x", {"options": ["o"]}) == "o"
    with pytest.raises(TypeError, match="returned a int"):
        data.AnswerFunction(len)("abc")


@pytest.mark.parametrize(
    "answer, expected",
    [("(B)", "green"), ("B", "green"), ("B)", "green"), ("B.", "green"), ("b", "green"), ("(b)", "green"),
     ("(B) green", "green"), ("Green!", "green"), ("blue", "blue"), ("(D)", "(D)"), ("purple", "purple")],
)
def test_answer_choice_maps_labels_and_texts_to_the_option(answer, expected):
    example = {"options": ["red", "green", "blue"]}
    assert data.AnswerChoice().extract(f"Because. So the answer is {answer}", example) == expected


def test_answer_choice_prefers_options_that_are_labels_themselves():
    # FLAN's AQuA options are the labels "(A)".. "(E)": the text match gives the same option.
    assert data.AnswerChoice()("So the answer is (C).", {"options": ["(A)", "(B)", "(C)"]}) == "(C)"
    assert data.AnswerChoice(data.AnswerRegex(r"<(.*)>"))("<A>", {"options": ["x", "y"]}) == "x"
    # The check says when no option could ever match a reference.
    assert data.AnswerChoice().check({"options": ["a", "b"], "references": ["c"]}).startswith("no answer option")
    assert data.AnswerChoice().check({"options": ["a", "b"], "references": ["B"]}) is None


def test_answer_given_as_a_marker_or_function_and_extractors_pickle():
    assert data.Template("{q}", "{a}", answer="####").answer == data.AnswerAfter("####")
    assert isinstance(data.Template("{q}", "{a}", answer=str.strip).answer, data.AnswerFunction)
    with pytest.raises(data.DataError, match="answer="):
        data.Template("{q}", "{a}", answer=3)
    for extractor in (data.AnswerAfter("x"), data.AnswerRegex("a"), data.AnswerChoice()):
        assert pickle.loads(pickle.dumps(extractor)) == extractor  # grain workers receive tasks by pickling


def test_a_task_reads_the_answer_with_its_templates_or_its_own_extractor():
    source = data.InMemorySource({"test": [{"q": "2+2", "a": "4", "r": "two and two"}]})
    cot = data.cot_templates(["{q}"], targets="{r}. So the answer is {a}.")
    task = data.Task("answers_cot", source, [("{q}", "{a}")], eval_templates=cot, references_field="a")
    example = task.get_dataset("test", template_set="eval")[0]
    assert example["template"] == "cot0" and task.answer_extractor("cot0") == data.AnswerAfter()
    assert task.extract_answer("Two and two. So the answer is 4.", example) == "4"
    assert task.score("Two and two. So the answer is 4.", example) == {"exact_match": 1.0}  # per example (RL reward)
    assert task.score("So the answer is 5.", example) == {"exact_match": 0.0}
    # Without an extractor the whole generation is the answer; a task-wide one applies to every template.
    plain = task.replace(name="answers_plain", eval_templates=[("{q}", "{a}")])
    assert plain.extract_answer("  So the answer is 4. ", plain.get_dataset("test", template_set="eval")[0]) == "So the answer is 4."
    marked = plain.replace(name="answers_marked", answer="####")
    assert marked.extract_answer("work\n#### 4", marked.get_dataset("test", template_set="eval")[0]) == "4"
