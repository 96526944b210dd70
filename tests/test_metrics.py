"""Hand-computed values for every text metric, including the normalization edge cases."""

import pytest

from flan_jax import data
from flan_jax.eval import metrics


@pytest.mark.parametrize(
    "text, expected",
    [
        ("The Cat", "the cat"),  # lowercase; SNI keeps articles
        ("  hello,   world!  ", "hello world"),  # punctuation deleted, whitespace collapsed
        ("U.S.A.", "usa"),  # punctuation is deleted, not replaced by a space
        ("co-operate", "cooperate"),
        ("tab\tand\nnewline", "tab and newline"),
        ("¿Qué?", "¿qué"),  # only ASCII punctuation is removed, like string.punctuation in SNI
        ("", ""),
    ],
)
def test_normalize_answer_matches_sni(text, expected):
    assert metrics.normalize_answer(text) == expected


def test_normalize_answer_squad_variant_removes_articles():
    assert metrics.normalize_answer("The answer is an apple.", remove_articles=True) == "answer is apple"
    # Articles only as whole words: "theatre" and "another" survive.
    assert metrics.normalize_answer("a theatre, another", remove_articles=True) == "theatre another"


def test_exact_match_normalizes_and_takes_max_over_references():
    assert metrics.exact_match("Paris.", ["paris"]) == 1.0
    assert metrics.exact_match("  PARIS ", ["Lyon", "Paris"]) == 1.0
    assert metrics.exact_match("Paris, France", ["Paris"]) == 0.0
    # SNI does not remove articles, so these differ (SQuAD's normalization would call them equal).
    assert metrics.exact_match("the Eiffel tower", ["Eiffel Tower"]) == 0.0


def test_exact_match_rejects_a_bare_string_reference():
    with pytest.raises(ValueError, match="list of strings"):
        metrics.exact_match("a", "a")
    with pytest.raises(ValueError, match="non-empty"):
        metrics.exact_match("a", [])


def test_rouge_l_hand_computed_with_stemming():
    # Tokens (stemmed): pred [the, cat, sat], ref [the, cat, sat, on, the, mat].
    # LCS = 3 -> precision 3/3, recall 3/6, F = 2 * 1 * 0.5 / 1.5 = 2/3.
    assert metrics.rouge_l("The cats sat", ["the cat sat on the mat"]) == pytest.approx(2 / 3)
    # Max over references: the second reference is identical up to case and punctuation.
    assert metrics.rouge_l("The cats sat", ["a dog", "the cats sat!"]) == pytest.approx(1.0)
    assert metrics.rouge_l("xyz", ["abc"]) == 0.0
    # Only [a-z0-9] survive the default tokenizer: non-English text scores 0 (SNI's default track).
    assert metrics.rouge_l("日本", ["日本"]) == 0.0


@pytest.mark.parametrize(
    "text, expected",
    [
        ("She pays $1,234.50 in total.", 1234.5),
        ("First 3 apples, then 5. So the answer is 18.", 18.0),
        ("The answer is -7 degrees", -7.0),
        ("It costs -$5", -5.0),
        ("It costs $-5", -5.0),
        ("Natalia sold 48/2 = 24 clips.\n#### 72", 72.0),
        ("the answer is 3, not 4", 3.0),  # first number after the marker
        ("The answer is 2. Wait, the answer is 6.", 6.0),  # last marker wins
        ("values 5,6", 6.0),  # a list, not a thousands separator
        ("no number here", None),
        ("version v2 only", None),  # digits inside a word are not a number
        ("The answer is .5", 0.5),
        ("Total: 1,000,000", 1_000_000.0),
    ],
)
def test_extract_final_number(text, expected):
    assert metrics.extract_final_number(text) == expected


def test_gsm8k_accuracy_compares_numbers():
    assert metrics.gsm8k_accuracy("So the answer is 72.", ["Natalia ... #### 72"]) == 1.0
    assert metrics.gsm8k_accuracy("The answer is 3.50", ["3.5"]) == 1.0
    assert metrics.gsm8k_accuracy("The answer is $1,000.", ["1000"]) == 1.0
    assert metrics.gsm8k_accuracy("The answer is 71", ["#### 72"]) == 0.0
    assert metrics.gsm8k_accuracy("I do not know", ["72"]) == 0.0
    with pytest.raises(ValueError, match="no number"):
        metrics.gsm8k_accuracy("5", ["five"])


def test_mean_generation_metric_is_a_percentage():
    value = metrics.mean_generation_metric("exact_match", ["a", "b", "c", "d"], [["a"], ["x"], ["C"], ["d."]])
    assert value == pytest.approx(75.0)


def test_unknown_metric_names_the_task():
    metrics.check_metric_names(["exact_match", "loss", "rank_classification"], task="t")
    with pytest.raises(ValueError, match="'my_task'.*bleu"):
        metrics.check_metric_names(["bleu"], task="my_task")


# ---------------------------------------------------------------------------- the metric registry


@pytest.fixture
def scratch_metrics():
    names = []
    yield names
    for name in names:
        data.unregister_metric(name)


def test_builtins_are_registered_like_a_users_metric():
    assert set(data.metric_names()) >= {"exact_match", "rouge_l", "gsm8k_accuracy", "rank_classification", "loss"}
    assert data.get_metric("exact_match").fn is metrics.exact_match
    assert data.get_metric("rank_classification").prediction == "ranked_option"
    assert data.get_metric("rank_classification").needs_options
    assert data.get_metric("loss").prediction == "likelihood" and not data.get_metric("loss").higher_is_better
    # Per example, as an RL reward would call it; the default aggregate is the mean x 100.
    metric = data.get_metric("exact_match")
    assert metric.score("Paris.", ["paris"]) == 1.0 and metric.aggregate([1.0, 0.0, 0.0, 1.0]) == 50.0


def test_register_a_metric_by_decorator_or_call(scratch_metrics):
    scratch_metrics += ["uses_example", "length", "contains"]

    @data.register_metric("uses_example")
    def uses_example(prediction, references, example):
        return float(prediction in example["options"])

    assert uses_example("a", ["a"], {"options": ["a"]}) == 1.0  # the decorator returns the function
    assert data.get_metric("uses_example").score("b", ["a"], {"options": ["a", "b"]}) == 1.0
    data.register_metric("length", lambda prediction, references: len(prediction), aggregate=max)
    assert data.get_metric("length").aggregate([data.get_metric("length").score(p, ["x"]) for p in ("ab", "abcd")]) == 4
    contains = data.register_metric("contains", lambda p, refs: float(any(r in p for r in refs)))
    assert contains.score("it is Paris", ["Paris"]) == 1.0 and contains is data.get_metric("contains")
    with pytest.raises(data.DataError, match="already registered"):
        data.register_metric("contains", len)
    with pytest.raises(data.DataError, match="invalid metric name"):
        data.register_metric("has space", len)
    with pytest.raises(data.DataError, match="prediction="):
        data.register_metric("odd", len, prediction="tokens")
    with pytest.raises(ValueError, match="non-empty list"):
        contains.score("x", "x")


def test_unknown_metrics_fail_at_registration_with_close_matches():
    task = data.Task("metric_typo", data.InMemorySource({"test": [{"q": "x", "a": "y"}]}), [("{q}", "{a}")],
                     metrics=("exact_macth",))
    with pytest.raises(data.DataError, match=r"task 'metric_typo'.*exact_macth.*did you mean exact_match") as error:
        data.register_task(task)
    assert "data.register_metric" in str(error.value) and "metric_typo" not in data.list_names()


def test_gsm8k_accuracy_refuses_a_non_numeric_reference_before_generating():
    metric = data.get_metric("gsm8k_accuracy")
    assert metric.problem({"references": ["#### 72"]}) is None
    assert "compares numbers" in metric.problem({"references": ["(D)"]})
    task = data.Task("gsm8k_letters", data.InMemorySource({"test": [{"q": "x", "a": "12"}, {"q": "y", "a": "(D)"}]}),
                     [("{q}", "{a}")], metrics=("gsm8k_accuracy",))
    with pytest.raises(data.DataError, match=r"InMemorySource:test, record 1.*'\(D\)'.*compares numbers"):
        data.register_task(task)  # in-memory records are checked at registration
