"""A user's own benchmark, registered outside tasks/ and evaluated end to end with scripted generations.

Two tasks written for this test, in a module of the "user's" package (config.data.task_modules):
  my_bench.colors     chain of thought with lettered options; exemplars from a separate file; its
                      test records carry no rationale (an evaluation-only file)
  my_bench.capitals   chain of thought with free-text answers; one JSONL file carved into splits
The model's generations are written by the test ("... So the answer is (B)."), so the exact match
the evaluator reports can be counted by hand. Then each way of getting such a task wrong fails when
it is registered, with the file and line of the bad record.
"""

import json
import logging
import math
import sys
import textwrap

import numpy as np
import pytest
from eval_fakes import CASED_CHARS, BigramModel, CharTokenizer, ScriptedGenerate

from flan_jax import data, default_config
from flan_jax.eval import evaluator
from flan_jax.train import loop

TOK = CharTokenizer(CASED_CHARS, lowercase=False)

SHOTS = [  # the few-shot file: full CoT records, with the letter of the answer
    {"question": "What color is a banana?", "choices": ["yellow", "purple", "gray"], "answer": "yellow",
     "label": "(A)", "rationale": "Ripe bananas are yellow."},
    {"question": "What color is a frog?", "choices": ["orange", "green", "white"], "answer": "green",
     "label": "(B)", "rationale": "Most frogs are green."},
]
COLORS_TEST = [  # evaluation only: no rationale, no label
    {"question": "What color is grass?", "choices": ["red", "green", "blue"], "answer": "green"},
    {"question": "What color is the sky?", "choices": ["red", "green", "blue"], "answer": "blue"},
    {"question": "What color is snow?", "choices": ["black", "white", "red"], "answer": "white"},
    {"question": "What color is blood?", "choices": ["blue", "green", "red"], "answer": "red"},
    {"question": "What color is coal?", "choices": ["black", "gray", "pink"], "answer": "black"},
]
COUNTRIES = [("France", "Paris"), ("Peru", "Lima"), ("Chile", "Santiago"), ("Japan", "Tokyo"), ("Spain", "Madrid"),
             ("Egypt", "Cairo"), ("Italy", "Rome"), ("Kenya", "Nairobi"), ("Cuba", "Havana")]
CAPITALS = [{"country": c, "answer": a, "rationale": f"{a} is the capital of {c}."} for c, a in COUNTRIES]

# What the "model" answers to each evaluation question (keyed by a text only that question has).
REPLIES = {
    "grass?": "Grass is green. So the answer is (B).",  # label in parentheses: right
    "sky?": "The sky is blue. So the answer is C.",  # bare letter: right
    "snow?": "Snow is white. So the answer is white.",  # the option's text: right
    "blood?": "Blood is red. So the answer is (A).",  # (A) is "blue": wrong
    "coal?": "Coal is black. So the answer is A)",  # "A)": right
    "of France?": "Paris is the capital of France. So the answer is Paris.",  # right
    "of Japan?": "Japan's old capital. So the answer is Kyoto.",  # wrong
    "of Italy?": "So the answer is Rome.",  # right
}

MODULE = '''
import statistics

from flan_jax import data

DIR = {dir!r}


@data.register_metric("answer_chars", aggregate=statistics.mean)
def answer_chars(prediction, references):
    """Length of the extracted answer, averaged (not a percentage): a user's metric with its own aggregate."""
    return float(len(prediction))


COLORS = data.Task(
    "my_bench.colors",
    data.JsonlSource({{"test": DIR + "/colors_test.jsonl"}}),
    data.cot_templates(["Question: {{question}}\\n{{options}}"], targets="{{rationale}} So the answer is {{label}}.",
                       answer=data.AnswerChoice()),
    options_field="choices", option_styles=("parenthesized",), references_field="answer",
    few_shot=data.FewShot(source=data.JsonlSource({{"train": DIR + "/colors_shots.jsonl"}}), fixed_order=True),
    metrics=("exact_match",), cluster="my_bench",
)
CAPITALS = data.Task(
    "my_bench.capitals",
    data.CarvedSplits(data.JsonlSource({{"train": DIR + "/capitals.jsonl"}}), every=3),
    data.cot_templates(["Question: What is the capital of {{country}}?"]),
    references_field="answer", metrics=("exact_match", "answer_chars"), cluster="my_bench",
)
for task in (COLORS, CAPITALS):
    data.register_task(task, check=True)
data.register_mixture(data.Mixture("my_bench", [(COLORS.name, 1.0), (CAPITALS.name, 1.0)]))
'''


def _write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


@pytest.fixture
def my_bench(tmp_path, monkeypatch, clean_registry):
    """The user's package on the path, imported the way a run imports config.data.task_modules."""
    _write_jsonl(tmp_path / "colors_shots.jsonl", SHOTS)
    _write_jsonl(tmp_path / "colors_test.jsonl", COLORS_TEST)
    _write_jsonl(tmp_path / "capitals.jsonl", CAPITALS)
    (tmp_path / "my_bench_tasks.py").write_text(textwrap.dedent(MODULE.format(dir=str(tmp_path))))
    monkeypatch.syspath_prepend(str(tmp_path))
    data.import_task_modules(["my_bench_tasks"])
    yield sys.modules["my_bench_tasks"]
    sys.modules.pop("my_bench_tasks", None)
    data.unregister_metric("answer_chars")


def _config(seq_len=384, max_new_tokens=64):
    config = default_config.get_config()
    config.data.seq_len = seq_len
    config.eval.mixtures = ("my_bench",)
    config.eval.num_shots = 2
    config.eval.max_new_tokens = max_new_tokens
    config.eval.batch_size = 4
    return config


def _respond(prompt: str) -> str:
    """The reply for the question asked LAST in the prompt (exemplars come before it)."""
    key = max(REPLIES, key=prompt.rfind)
    assert prompt.rfind(key) >= 0, prompt
    return REPLIES[key]


def test_cot_answers_are_extracted_scored_and_reported(my_bench, tmp_path, caplog):
    generate = ScriptedGenerate(TOK, _respond)
    model = BigramModel(np.zeros((TOK.vocab_size, TOK.vocab_size)))  # uniform: loss = log(vocab) per token
    config = _config()
    with caplog.at_level(logging.WARNING):
        results = evaluator.evaluate(model, TOK, config, workdir=str(tmp_path), step=5, generate_fn=generate)

    colors, capitals = results["tasks"]["my_bench.colors"], results["tasks"]["my_bench.capitals"]
    assert colors["num_examples"] == 5 and capitals["num_examples"] == 3  # every 3rd of 9 lines is validation
    assert colors["metrics"]["exact_match"] == pytest.approx(100 * 4 / 5)  # all but "blood"
    assert capitals["metrics"]["exact_match"] == pytest.approx(100 * 2 / 3)  # all but "Kyoto"
    assert capitals["metrics"]["answer_chars"] == pytest.approx((5 + 5 + 4) / 3)  # Paris, Kyoto, Rome
    # The colors test file has no rationale: its examples have no targets, so the default extra
    # metric "loss" is left out of that task (said so), and computed for capitals.
    assert "loss" not in colors["metrics"] and "no targets" in colors["skipped_metrics"]["loss"]
    assert capitals["metrics"]["loss"] == pytest.approx(math.log(TOK.vocab_size), rel=1e-5)
    assert results["overall"]["perplexity"] == pytest.approx(math.exp(results["overall"]["loss"]))

    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions_5_2shot.jsonl").read_text().splitlines()]
    by_question = {next(k for k in REPLIES if k in r["inputs"].rsplit("Question:", 1)[1]): r for r in records}
    grass = by_question["grass?"]
    assert grass["generation"] == REPLIES["grass?"] and grass["prediction"] == "green"
    assert by_question["sky?"]["prediction"] == "blue" and by_question["coal?"]["prediction"] == "black"
    assert by_question["blood?"]["prediction"] == "blue" and by_question["blood?"]["scores"] == {"exact_match": 0.0}
    assert by_question["of Japan?"]["prediction"] == "Kyoto" and by_question["of France?"]["prediction"] == "Paris"
    # The two exemplars come from the separate file, in its order, before the query; lettered options.
    assert grass["inputs"].index("banana") < grass["inputs"].index("frog") < grass["inputs"].index("grass")
    assert "So the answer is (A)." in grass["inputs"] and "(B) green" in grass["inputs"]

    # Truncation: generation prompts keep seq_len - max_new_tokens tokens (BOS included).
    budget = config.data.seq_len - config.eval.max_new_tokens
    for name, result in results["tasks"].items():
        inputs = [r["inputs"] for r in records if r["task"] == name]
        cut = [max(0, len(text) + 1 - budget) for text in inputs]  # one token per character
        assert [r["prompt_tokens_cut"] for r in records if r["task"] == name] == cut
        counts = result["truncation"]
        assert counts["prompts_truncated"] == sum(c > 0 for c in cut)
        assert counts["prompt_tokens_cut_max"] == max(cut)
    assert results["tasks"]["my_bench.colors"]["truncation"]["prompts_truncated"] == 5  # the long few-shot prompts
    assert results["tasks"]["my_bench.capitals"]["truncation"]["prompts_truncated"] == 0
    assert all(len(p) <= budget - 1 for p in generate.prompts)  # what the model saw was cut to fit
    report = (tmp_path / "eval" / "step_5_2shot.md").read_text()
    assert "### Truncation" in report and "| my_bench.colors | 5 | 5 |" in report
    assert any("my_bench.colors: 5 of 5 prompts cut" in r.getMessage() for r in caplog.records)


def test_targets_that_cannot_fit_in_max_new_tokens_are_counted(my_bench, tmp_path):
    config = _config(max_new_tokens=40)  # the capitals CoT targets are 50-60 characters
    results = evaluator.evaluate(
        BigramModel(np.zeros((TOK.vocab_size, TOK.vocab_size))), TOK, config, workdir=str(tmp_path), step=1,
        generate_fn=ScriptedGenerate(TOK, _respond),
    )
    validation = data.get_task("my_bench.capitals").get_dataset("validation", shuffle=False, template_set="eval")
    expected = sum(len(ex["targets"]) > 40 for ex in validation)
    assert expected == 3 and results["tasks"]["my_bench.capitals"]["truncation"]["targets_over_max_new_tokens"] == 3
    assert results["tasks"]["my_bench.capitals"]["truncation"]["references_over_max_new_tokens"] == 0


def test_each_mistake_fails_at_registration_with_its_location(my_bench, tmp_path):
    colors, capitals = my_bench.COLORS, my_bench.CAPITALS

    def register(task, **kwargs):
        with pytest.raises(data.DataError) as error:
            data.register_task(task, check=True, **kwargs)
        assert task.name not in data.list_names()  # nothing half-registered
        return error.value

    error = register(colors.replace(name="bad.metric", metrics=("exact_mach",)))
    assert error.task == "bad.metric" and "exact_mach" in str(error) and "did you mean exact_match" in str(error)

    bad = [dict(r) for r in COLORS_TEST]
    bad[3]["answer"] = "purple"  # not among the options
    _write_jsonl(tmp_path / "colors_bad.jsonl", bad)
    error = register(colors.replace(name="bad.options", source=data.JsonlSource({"test": tmp_path / "colors_bad.jsonl"})))
    assert error.file.endswith("colors_bad.jsonl") and error.line == 4 and error.field == "choices"
    assert "no answer option" in str(error) and "purple" in str(error)

    error = register(capitals.replace(name="bad.template", templates=[("Capital of {countyr}?", "{answer}")]))
    assert error.file.endswith("capitals.jsonl") and error.line == 2 and error.field == "countyr"  # line 1 is validation
    assert error.template == "t0"

    error = register(colors.replace(name="bad.gsm8k", metrics=("gsm8k_accuracy",)))
    assert error.file.endswith("colors_test.jsonl") and error.line == 1 and "compares numbers" in str(error)

    broken = [dict(r) for r in CAPITALS]
    del broken[4]["answer"]  # line 5: in the carved training split (every 3rd line, from the 1st, is validation)
    _write_jsonl(tmp_path / "capitals_bad.jsonl", broken)
    source = data.CarvedSplits(data.JsonlSource({"train": tmp_path / "capitals_bad.jsonl"}), every=3)
    error = register(capitals.replace(name="bad.carved", source=source))
    assert error.file.endswith("capitals_bad.jsonl") and error.line == 5 and error.field == "answer"

    shots = [dict(s) for s in SHOTS]
    del shots[1]["label"]
    _write_jsonl(tmp_path / "shots_bad.jsonl", shots)
    few_shot = data.FewShot(source=data.JsonlSource({"train": tmp_path / "shots_bad.jsonl"}))
    error = register(colors.replace(name="bad.shots", few_shot=few_shot))
    assert error.file.endswith("shots_bad.jsonl") and error.line == 2 and error.field == "label"

    error = register(capitals.replace(name="bad.rank", metrics=("rank_classification",)))
    assert "needs answer options" in str(error) and error.task == "bad.rank"
    error = register(capitals.replace(name="bad.choice", templates=[("{country}", "{answer}")], answer=data.AnswerChoice()))
    assert "AnswerChoice maps answers to options" in str(error) and error.template == "t0"


def test_without_check_the_run_start_catches_it_before_any_generation(my_bench, tmp_path):
    """Registered lazily (the default for files), a bad reference fails when the run starts, not after generating."""
    task = my_bench.COLORS.replace(name="my_bench.colors_gsm8k", metrics=("gsm8k_accuracy",))
    data.register_task(task)  # file source: records not read at registration
    config = _config()
    config.eval.mixtures = (task.name,)
    with pytest.raises(data.DataError, match=r"colors_test.jsonl:1.*compares numbers"):
        loop.check_evaluation(config)  # what train() calls before its first step
    generate = ScriptedGenerate(TOK, _respond)
    with pytest.raises(data.DataError, match="compares numbers"):
        evaluator.evaluate(BigramModel(np.zeros((TOK.vocab_size,) * 2)), TOK, config, workdir=None, step=0,
                           generate_fn=generate)
    assert generate.prompts == []
