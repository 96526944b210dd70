"""Real-data tasks (T0/P3, FLAN CoT, GSM8K, evaluation-only sets) and the mixtures built from them.

Tests that read files use the `real_data_dir` fixture (skipped when FLAN_JAX_DATA_DIR is unset);
the others check what registration promises without any data on disk.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import pathlib

import pytest

from flan_jax import data
from flan_jax_tasks import flan_cot, preprocessors, t0, t0_catalog

ROOT = pathlib.Path(__file__).resolve().parents[1]


def _load_config(path: str, *args):
    spec = importlib.util.spec_from_file_location("config_under_test", ROOT / path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config(*args)


# ----------------------------------------------------------------------------- no data needed
def test_registration_needs_no_data(monkeypatch):
    monkeypatch.delenv("FLAN_JAX_DATA_DIR", raising=False)
    assert len([n for n in data.list_names("task") if n.startswith("t0.")]) == 294
    assert data.get_task("t0.imdb.Movie_Expressed_Sentiment").cluster == "sentiment"
    fresh = t0._task("imdb", "Movie_Expressed_Sentiment")  # the registered one may have cached records
    with pytest.raises(data.DataUnavailableError):
        fresh.num_examples("train")


def test_t0_catalog_covers_37_datasets_in_8_clusters():
    assert len(t0_catalog.CLUSTERS) == 8
    assert len(t0_catalog.TEMPLATES) == 37 == len(t0_catalog.CLUSTER_OF_DATASET)
    assert set(t0_catalog.TEMPLATES) == set(t0_catalog.CLUSTER_OF_DATASET)
    assert len(t0_catalog.file_stems()) == 294 and len(t0_catalog.EMPTY_FILES) == 11


@pytest.mark.parametrize("cluster", sorted(t0_catalog.CLUSTERS))
def test_leave_one_cluster_out_mixture_has_no_task_of_the_held_out_cluster(cluster):
    training = data.get_mixture(f"t0_minus_{cluster}").tasks
    clusters = {task.cluster for task in training}
    assert cluster not in clusters
    assert clusters == set(t0_catalog.CLUSTERS) - {cluster}
    held_out = {task.name for task in data.get_mixture(f"t0_{cluster}").tasks}
    assert held_out and not held_out & {task.name for task in training}
    config = _load_config("configs/t0_holdout.py", cluster)
    assert config.data.train_mixture == f"t0_minus_{cluster}"
    assert config.eval.mixtures == (f"t0_{cluster}",)


def test_t0_holdout_config_rejects_a_missing_or_unknown_cluster():
    for argument in (None, "sentimental"):
        with pytest.raises(ValueError, match="clusters: multiple_choice_qa"):
            _load_config("configs/t0_holdout.py", argument)


def test_unusable_files_are_in_no_mixture():
    assert len(t0_catalog.UNUSABLE_FILES) == 18  # every TREC file of this subset
    empty = {f"t0.trec.{stem.removeprefix('trec_')}" for stem in t0_catalog.UNUSABLE_FILES}
    assert empty <= set(data.list_names("task"))
    for name in ["t0", "flan_mini", "t0_topic_classification", "t0_minus_sentiment"]:
        assert not empty & {task.name for task in data.get_mixture(name).tasks}, name


def test_flan_mini_config_and_mixture():
    config = _load_config("configs/flan_mini.py")
    assert config.data.train_mixture == "flan_mini"
    tasks = {task.name for task in data.get_mixture("flan_mini").tasks}
    assert "gsm8k" in tasks and "flan_cot.aqua" in tasks and "flan_cot.aqua.answer_only" in tasks
    assert "t0.imdb.Movie_Expressed_Sentiment" in tasks
    assert not tasks & {"gsm8k.answer_only", "alpaca_eval", "self_instruct_user_oriented", "mt_bench_first_turn"}
    for name in config.eval.mixtures:
        data.get(name)


@pytest.mark.parametrize("question, options", [
    ("Q?\nOptions:\n(A) 300\n(B) 992", ["(A)", "(B)"]),
    ("Q?\nOptions:\n- (A) DNA\n- (B) photosynthesis", ["(A)", "(B)"]),
    ('Which?\nOptions:\n- Sentence A: "He drinks apple."\n- Sentence B: "He drinks milk."\n',
     ["Sentence A", "Sentence B"]),
    ("Where?\nOptions:\n- bloody mess\n- pleasure", ["bloody mess", "pleasure"]),
    ("Is it?", []),
])
def test_parse_cot_options(question, options):
    assert preprocessors.parse_options(question) == options


def test_gsm8k_answer_split_removes_calculator_annotations():
    record = {"answer": "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 1,018"}
    out = preprocessors.split_gsm8k_answer(record)
    assert out["number"] == "1018"
    assert out["rationale"] == "She sells 16 - 3 - 4 = 9 eggs.\nShe makes 9 * 2 = $18."
    with pytest.raises(data.DataError, match="####"):
        preprocessors.split_gsm8k_answer({"answer": "no final answer"})


# ----------------------------------------------------------------------------- real data
def test_mojibake_is_repaired_only_where_it_round_trips():
    repair = preprocessors.repair_mojibake("question")
    assert repair({"question": "Age of (A + B) \u00e2\u20ac\u201c Age of A"})["question"] == "Age of (A + B) \u2013 Age of A"
    untouched = {"question": "caf\u00e9 \u00c3 la carte \u20ac5"}  # markers, but not a valid round trip
    assert repair(untouched) == untouched
    assert repair({"question": "plain"}) == {"question": "plain"}


def test_aqua_cot_text_has_no_mojibake_left(real_data_dir):
    records = data.get("flan_cot.aqua").records("train")
    assert not [r for r in records if "\u00e2\u20ac" in r["question"] + r["rationale"]]
    assert any("\u2013" in r["question"] + r["rationale"] or "\u2018" in r["question"] for r in records)


def test_t0_files_match_the_catalog_and_empty_files_are_reported(real_data_dir, caplog):
    with caplog.at_level(logging.WARNING):
        report = t0.check_files(real_data_dir)
    assert report["missing"] == [] and report["unexpected"] == []
    assert sorted(report["empty"]) == sorted(t0_catalog.EMPTY_FILES)
    assert sorted(report["empty_completions"]) == sorted(t0_catalog.EMPTY_COMPLETION_FILES)
    assert sum(report["records"].values()) == 55_185
    assert "11 empty file(s)" in caplog.text and "7 empty_completions file(s)" in caplog.text
    single = set(report["single_answer"])
    assert {"imdb_Movie_Expressed_Sentiment", "rotten_tomatoes_Reviewer_Enjoyment", "dbpedia_14_pick_one_category_for_the_following_text"} <= single
    assert "amazon_polarity_Is_this_review" not in single and not single & set(t0_catalog.UNUSABLE_FILES)


def test_t0_records_per_task_and_cluster(real_data_dir, caplog):
    report = t0.check_files(real_data_dir)
    for stem in ["imdb_Movie_Expressed_Sentiment", "wiki_qa_Direct_Answer_to_Question", "ag_news_classify"]:
        dataset, template = next((d, stem[len(d) + 1:]) for d in t0_catalog.TEMPLATES
                                 if stem.startswith(d + "_") and stem[len(d) + 1:] in t0_catalog.TEMPLATES[d])
        task = data.get_task(t0.task_name(dataset, template))
        train, validation = task.num_examples("train"), task.num_examples("validation")
        assert train + validation == report["records"][stem]
        assert validation == -(-report["records"][stem] // t0.VALIDATION_EVERY)  # ceil: indices 0, 10, 20, ...
    # Whole sentiment cluster: 5 datasets, 41 files of (almost) 200 records.
    sentiment = data.get_mixture("t0_sentiment").tasks
    assert len(sentiment) == 41
    total = sum(task.num_examples("train") + task.num_examples("validation") for task in sentiment)
    expected = sum(n for stem, n in report["records"].items()
                   if t0_catalog.CLUSTER_OF_DATASET[next(d for d in t0_catalog.TEMPLATES
                                                         if stem.startswith(d + "_")
                                                         and stem[len(d) + 1:] in t0_catalog.TEMPLATES[d])]
                   == "sentiment")
    assert total == expected
    # The empty files load as empty (with a warning naming the file), without an error.
    empty_task = data.get_task("t0.trec.fine_grained_ABBR")
    with caplog.at_level(logging.WARNING):
        assert empty_task.num_examples("train") == 0
    assert any("trec_fine_grained_ABBR.jsonl" in path for path in empty_task.source.empty_files)
    # A file of empty completions: every record dropped, counted and logged.
    blank = data.get_task("t0.trec.trec1")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert blank.num_examples("train") == 0
    assert blank.filtered["train"] == 180 and "dropped 180 of 180" in caplog.text


def test_t0_marker_is_stripped(real_data_dir):
    task = data.get_task("t0.ag_news.classify_with_choices")
    raw = json.loads((real_data_dir / "t0" / "ag_news_classify_with_choices.jsonl").read_text().split("\n")[0])
    assert raw["completion"].endswith("<|endoftext|>")
    examples = task.get_dataset("validation", shuffle=False)
    first = examples[0]
    assert first["inputs"] == raw["prompt"] and first["targets"] == raw["completion"].removesuffix("<|endoftext|>")
    for name in ["t0.imdb.Movie_Expressed_Sentiment", "t0.xsum.DOC_tldr", "t0.dream.baseline"]:
        dataset = data.get_task(name).get_dataset("train", shuffle=False)
        assert not any("<|endoftext|>" in dataset[i]["targets"] for i in range(len(dataset)))


def test_t0_mixture_rates_cover_every_non_empty_task(real_data_dir, caplog):
    rates = data.get_mixture("t0").rates()
    assert len(rates) == 294 - 18
    assert abs(sum(rates.values()) - 1.0) < 1e-9


def test_cot_newlines_decoded_and_templates(real_data_dir):
    cot = data.get_task("flan_cot.aqua")
    raw_line = (real_data_dir / "flan_cot" / "aqua_train.tsv").read_text().split("\n")[0]
    question, answer, rationale = raw_line.split("\t")
    assert "\\n" in question
    record = cot.records("validation")[0]  # record 0 of the file is in validation
    assert record["question"] == question.replace("\\n", "\n") and "\\n" not in record["question"]
    assert record["rationale"] == rationale.replace("\\n", "\n")
    example = cot.get_dataset("validation", shuffle=False)[0]
    assert example["targets"] == f"{record['rationale']} So the answer is {answer}."
    assert example["inputs"].startswith(("", "Question: ", "Q: ", "Answer", "Here"))
    assert any(trigger in example["inputs"] for trigger in data.COT_TRIGGERS)
    direct = data.get_task("flan_cot.aqua.answer_only").get_dataset("validation", shuffle=False)[0]
    assert direct["targets"] == answer == "(C)"
    assert direct["options"] == ["(A)", "(B)", "(C)", "(D)", "(E)"]
    assert not any(trigger in direct["inputs"] for trigger in data.COT_TRIGGERS)


@pytest.mark.parametrize("name, records", [("aqua", 2728), ("creak", 6915), ("ecqa", 7112), ("gsm8k", 7473),
                                           ("qasc", 1084), ("sensemaking", 6070), ("strategyqa", 2061)])
def test_cot_record_counts(real_data_dir, name, records):
    task = data.get_task(f"flan_cot.{name}.answer_only")
    assert task.num_examples("train") + task.num_examples("validation") == records
    if name in flan_cot.WITH_OPTIONS:
        example = task.get_dataset("train", shuffle=False)[0]
        assert example["targets"] in example["options"]


def test_gsm8k_answers_and_splits(real_data_dir):
    task = data.get_task("gsm8k")
    assert task.num_examples("train") == 7473 and task.num_examples("test") == 1319
    example = task.get_dataset("test", shuffle=False, template_set="eval")[0]
    assert example["references"] == ["18"]  # Janet's ducks: "#### 18"
    assert example["targets"].endswith("So the answer is 18.")
    assert "<<" not in example["targets"]
    assert task.metrics == ("gsm8k_accuracy",)
    direct = data.get_task("gsm8k.answer_only").get_dataset("test", shuffle=False)[0]
    assert direct["targets"] == "18"


def test_evaluation_only_tasks(real_data_dir):
    self_instruct = data.get_task("self_instruct_user_oriented")
    alpaca_eval = data.get_task("alpaca_eval")
    mt_bench = data.get_task("mt_bench_first_turn")
    assert self_instruct.splits == alpaca_eval.splits == mt_bench.splits == ("test",)
    assert self_instruct.num_examples("test") == 252
    assert alpaca_eval.num_examples("test") == 805
    assert mt_bench.num_examples("test") == 80
    example = self_instruct.get_dataset("test", shuffle=False)[1]
    assert example["references"] == ["Confident"]
    assert example["inputs"].startswith("Analyze the word choice") and "Hi Jen," in example["inputs"]
    example = alpaca_eval.get_dataset("test", shuffle=False)[0]
    assert example["references"][0].startswith("Some famous actors")
    first = mt_bench.get_dataset("test", shuffle=False)[0]
    assert first["inputs"].startswith("Compose an engaging travel blog post") and mt_bench.metrics == ()
    for task in (self_instruct, alpaca_eval):
        assert task.metrics == ("rouge_l",)


def test_flan_mini_rates_follow_flan_weights(real_data_dir):
    rates = data.get_mixture("flan_mini").rates()
    t0_share = sum(rate for name, rate in rates.items() if name.startswith("t0."))
    assert abs(t0_share - 0.32 / 0.37) < 1e-9
    assert "gsm8k" in rates and "flan_cot.gsm8k" not in rates
