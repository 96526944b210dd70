"""The evaluator end to end on stand-in tasks and a bigram model whose answers are known in advance."""

import json

import numpy as np
import pytest
from eval_fakes import EOS, BigramModel, CharTokenizer, FakeMixture, FakeTask, bigram_log_likelihood, greedy_bigram_generate

from flan_jax import default_config
from flan_jax.eval import evaluator, scoring

TOK = CharTokenizer()


def _table():
    """Greedy answers: after 'x' -> "y" then stop; after 'q' -> "z" then stop."""
    table = np.zeros((TOK.vocab_size, TOK.vocab_size))
    x, y, z, q = TOK.encode("xyzq")
    table[x, y] = table[y, EOS] = 10.0
    table[q, z] = table[z, EOS] = 10.0
    return table


def _registry():
    copy = FakeTask("copy", "gen", ["exact_match", "rouge_l"], {"validation": [
        {"inputs": "ax", "targets": "y"},  # predicted "y": right
        {"inputs": "bx", "targets": "Y."},  # right after normalization
        {"inputs": "cq", "targets": "y"},  # predicted "z": wrong
        {"inputs": "dq", "targets": "w"},  # wrong
    ]})
    choice = FakeTask("choice", "cls", ["rank_classification"], {"validation": [
        {"inputs": "x", "targets": "y", "options": ["y", "a"]},  # the model prefers "y": right
        {"inputs": "x", "targets": "a", "options": ["a", "y"]},  # wrong
    ]})
    only_test = FakeTask("only_test", "cls", ["exact_match"], {"test": [{"inputs": "x", "targets": "y"}]})
    entries = {t.name: t for t in (copy, choice, only_test)}
    entries["mix_a"] = FakeMixture("mix_a", [copy, choice])
    entries["mix_b"] = FakeMixture("mix_b", ["only_test", "copy"])  # names resolve through the registry too
    return entries


@pytest.fixture
def registry(monkeypatch):
    entries = _registry()
    monkeypatch.setattr(evaluator, "_lookup", lambda name: entries[name])
    return entries


def _config(num_shots=0):
    config = default_config.get_config()
    config.data.seq_len = 64
    config.eval.mixtures = ("mix_a", "mix_b")
    config.eval.max_new_tokens = 4
    config.eval.batch_size = 4
    config.eval.num_shots = num_shots
    return config


def test_evaluate_hand_computed_metrics_and_files(registry, tmp_path):
    model = BigramModel(_table())
    results = evaluator.evaluate(model, TOK, _config(), workdir=str(tmp_path), step=7, generate_fn=greedy_bigram_generate)
    tasks = results["tasks"]
    assert tasks["copy"]["metrics"]["exact_match"] == pytest.approx(50.0)
    assert tasks["copy"]["metrics"]["rouge_l"] == pytest.approx(50.0)
    assert tasks["choice"]["metrics"]["rank_classification"] == pytest.approx(50.0)
    assert tasks["only_test"]["metrics"]["exact_match"] == pytest.approx(100.0)
    assert tasks["only_test"]["split"] == "test"  # no validation split: fell back to test
    assert tasks["copy"]["mixtures"] == ["mix_a", "mix_b"]

    # Loss (an extra metric for every task) by hand: mean NLL per target token incl. EOS.
    table = _table()
    choice_examples = registry["choice"]._splits["validation"]
    nll = -sum(
        bigram_log_likelihood(table, scoring.encode_prompt(TOK, e["inputs"]), scoring.encode_target(TOK, e["targets"]))
        for e in choice_examples
    )
    assert tasks["choice"]["metrics"]["loss"] == pytest.approx(nll / 4, rel=1e-5)

    # Macro averages: each task counts once, metrics over the tasks that have them.
    assert results["clusters"]["cls"]["exact_match"] == pytest.approx(100.0)
    assert results["clusters"]["cls"]["num_tasks"] == 2
    assert results["overall"]["exact_match"] == pytest.approx(75.0)
    assert results["overall"]["rouge_l"] == pytest.approx(50.0)
    assert results["mixtures"]["mix_b"]["exact_match"] == pytest.approx(75.0)
    assert results["summary"]["overall/exact_match"] == pytest.approx(75.0)

    # Evaluation asks for the unshuffled eval-template split.
    assert registry["copy"].calls[0]["shuffle"] is False
    assert registry["copy"].calls[0]["num_shots"] == 0

    written = json.loads((tmp_path / "eval" / "step_7.json").read_text())
    assert written["tasks"] == json.loads(json.dumps(tasks)) and written["step"] == 7
    assert written["config"]["eval"]["max_new_tokens"] == 4
    table_md = (tmp_path / "eval" / "step_7.md").read_text()
    assert "| copy (gen) | 4 | 50.00 | 50.00 |" in table_md
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions_7.jsonl").read_text().splitlines()]
    assert len(records) == 4 + 2 + 1
    by_inputs = {(r["task"], r["inputs"]): r for r in records}
    assert by_inputs[("copy", "cq")]["prediction"] == "z"
    assert by_inputs[("copy", "bx")]["references"] == ["Y."]
    assert by_inputs[("choice", "x")]["rank_prediction"] == by_inputs[("choice", "x")]["prediction"] == "y"


def test_a_task_without_metrics_is_generated_for_a_judge_and_not_scored(registry, tmp_path):
    registry["open"] = FakeTask("open", "chat", [], {"test": [{"inputs": "x", "targets": ""}]})
    config = _config()
    config.eval.mixtures = ("mix_a", "open")
    model = BigramModel(_table())
    results = evaluator.evaluate(model, TOK, config, workdir=str(tmp_path), step=1, generate_fn=greedy_bigram_generate)
    assert results["tasks"]["open"]["metrics"] == {}
    assert results["overall"]["exact_match"] == pytest.approx(50.0)  # copy only: "open" does not dilute it
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions_1.jsonl").read_text().splitlines()]
    assert [r["prediction"] for r in records if r["task"] == "open"] == ["y"]


def test_few_shot_uses_the_same_task_definition(registry, tmp_path):
    results = evaluator.evaluate(
        BigramModel(_table()), TOK, _config(num_shots=2), workdir=str(tmp_path), step=0, generate_fn=greedy_bigram_generate
    )
    assert results["num_shots"] == 2
    assert registry["copy"].calls[-1]["num_shots"] == 2
    records = (tmp_path / "eval" / "predictions_0_2shot.jsonl").read_text()
    assert '"inputs": "example. example. ax"' in records


def test_unknown_metric_fails_naming_the_task(registry, tmp_path):
    registry["copy"].metrics = ["bleu"]
    with pytest.raises(ValueError, match="'copy'.*bleu"):
        evaluator.evaluate(BigramModel(_table()), TOK, _config(), workdir=None, step=0, generate_fn=greedy_bigram_generate)


def test_bad_examples_fail_with_the_task_named(registry):
    registry["choice"]._splits["validation"][1]["options"] = ["b", "y"]  # the reference "a" is not an option
    calls = []

    def generate(*args, **kwargs):
        calls.append(1)
        return greedy_bigram_generate(*args, **kwargs)

    with pytest.raises(ValueError, match="'choice', record 1: metric 'rank_classification': no answer option"):
        evaluator.evaluate(BigramModel(_table()), TOK, _config(), workdir=None, step=0, generate_fn=generate)
    assert not calls  # found before anything was generated
    registry["choice"]._splits = {"train": []}
    registry["choice"].splits = ("train",)
    with pytest.raises(ValueError, match="'choice' has neither a 'validation' nor a 'test' split"):
        evaluator.evaluate(BigramModel(_table()), TOK, _config(), workdir=None, step=0, generate_fn=greedy_bigram_generate)


def test_generate_texts_batches_keep_the_order():
    prompts = ["x", "aaaaaaq", "bx", "q", "ccx"]
    texts = evaluator.generate_texts(
        BigramModel(_table()), TOK, prompts, max_new_tokens=3, max_len=32, batch_size=2, generate_fn=greedy_bigram_generate
    )
    assert texts == ["y", "z", "y", "z", "y"]


@pytest.fixture
def registered_task():
    """A real flan_jax.data task: eval templates differ from training ones, answer options, a train split for shots."""
    from flan_jax import data

    records = {
        "train": [{"q": f"tr{i}", "a": "y", "choices": ["y", "a"]} for i in range(5)],
        "validation": [{"q": f"va{i}x", "a": "y", "choices": ["a", "y"]} for i in range(3)],
    }
    task = data.Task(
        "eval_test_registered",
        data.InMemorySource(records),
        [("train template {q}", "{a}")],
        eval_templates=[("held-out template {q}", "{a}")],
        metrics=("exact_match", "rank_classification"),
        cluster="testing",
        options_field="choices",
    )
    data.register_task(task, replace=True)
    yield task
    data.unregister(task.name)


def test_zero_and_few_shot_from_the_same_registered_task(registered_task, tmp_path):
    config = _config()
    config.eval.mixtures = (registered_task.name,)
    model = BigramModel(_table())
    zero = evaluator.evaluate(model, TOK, config, workdir=str(tmp_path), step=1, generate_fn=greedy_bigram_generate)
    config.eval.num_shots = 2
    few = evaluator.evaluate(model, TOK, config, workdir=str(tmp_path), step=2, generate_fn=greedy_bigram_generate)

    def records(step):
        return [json.loads(line) for line in (tmp_path / "eval" / f"predictions_{step}.jsonl").read_text().splitlines()]

    zero_records, few_records = records(1), records("2_2shot")
    assert json.loads((tmp_path / "eval" / "step_2_2shot.json").read_text())["num_shots"] == 2
    assert not (tmp_path / "eval" / "step_2.json").exists()
    assert [r["inputs"] for r in zero_records] == [f"held-out template va{i}x" for i in range(3)]
    for z, f in zip(zero_records, few_records):
        # Same query, rendered with the same (held-out) template, after two exemplars from the train split.
        assert f["inputs"].endswith(z["inputs"]) and f["inputs"].count("held-out template tr") == 2
        assert z["options"] == ["a", "y"]
    # The model answers "y" after "x", and prefers option "y": both metrics are perfect, zero- and few-shot.
    for results in (zero, few):
        assert results["tasks"][registered_task.name]["metrics"]["exact_match"] == pytest.approx(100.0)
        assert results["tasks"][registered_task.name]["metrics"]["rank_classification"] == pytest.approx(100.0)
        assert results["clusters"]["testing"]["num_tasks"] == 1


def test_evaluate_with_the_real_transformer_and_generate(registered_task, tmp_path):
    """The default path (flan_jax.model.generate) end to end; near-uniform logits give loss ~ log(vocab)."""
    from flax import nnx

    from flan_jax import model as fm

    cfg = fm.ModelConfig.for_family(
        "llama", vocab_size=TOK.vocab_size, d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, d_ff=32,
        max_positions=128, init_std=1e-4,
    )
    model = fm.Transformer(cfg, rngs=nnx.Rngs(0))
    config = _config()
    config.eval.mixtures = (registered_task.name,)
    results = evaluator.evaluate(model, TOK, config, workdir=str(tmp_path), step=3)
    metrics = results["tasks"][registered_task.name]["metrics"]
    assert metrics["loss"] == pytest.approx(np.log(TOK.vocab_size), abs=0.05)
    assert 0.0 <= metrics["exact_match"] <= 100.0 and 0.0 <= metrics["rank_classification"] <= 100.0
    records = [json.loads(line) for line in (tmp_path / "eval" / "predictions_3.jsonl").read_text().splitlines()]
    assert len(records) == 3 and all(isinstance(r["prediction"], str) for r in records)


def test_group_perplexity_is_exp_of_the_macro_loss_not_a_mean_of_perplexities(registry):
    results = evaluator.evaluate(BigramModel(_table()), TOK, _config(), workdir=None, step=0,
                                 generate_fn=greedy_bigram_generate)
    losses = [t["metrics"]["loss"] for t in results["tasks"].values()]
    assert len(set(losses)) > 1  # the tasks differ, so the two definitions differ
    assert results["overall"]["loss"] == pytest.approx(np.mean(losses))
    assert results["overall"]["perplexity"] == pytest.approx(np.exp(np.mean(losses)))
    assert results["overall"]["perplexity"] < np.mean([np.exp(loss) for loss in losses])
    for task in results["tasks"].values():
        assert task["metrics"]["perplexity"] == pytest.approx(np.exp(task["metrics"]["loss"]))
    assert "macro average" in results["definitions"]["loss"]


def test_truncation_is_counted_reported_and_warned_about(registry, tmp_path, caplog):
    registry["copy"]._splits["validation"] += [
        {"inputs": "z" * 40 + "x", "targets": "y"},  # a prompt longer than seq_len - max_new_tokens
        {"inputs": "ex", "targets": "far too long"},  # a reference longer than max_new_tokens
    ]
    config = _config()
    config.data.seq_len = 32  # generation prompts keep 32 - 4 = 28 tokens
    with caplog.at_level("WARNING"):
        results = evaluator.evaluate(BigramModel(_table()), TOK, config, workdir=str(tmp_path), step=3,
                                     generate_fn=greedy_bigram_generate)
    counts = results["tasks"]["copy"]["truncation"]
    assert counts["prompts_truncated"] == 1 and counts["prompt_tokens_cut_max"] == 1 + 41 - 28  # BOS + 41 chars
    assert counts["references_over_max_new_tokens"] == 1 and counts["max_prompt_tokens"] == 28
    assert results["tasks"]["copy"]["metrics"]["exact_match"] == pytest.approx(100 * 3 / 6)  # the cut prompt still ends in x
    assert results["tasks"]["choice"]["truncation"]["ranked_examples_cut"] == 0
    report = (tmp_path / "eval" / "step_3.md").read_text()
    assert "| copy | 6 | 1 | 14.0 | 14 | 1 | 0 |" in report
    assert any("copy: 1 of 6 prompts cut to 28 tokens" in r.getMessage() for r in caplog.records)
    nothing_cut = evaluator.evaluate(BigramModel(_table()), TOK, _config(), workdir=None, step=0,
                                     generate_fn=greedy_bigram_generate)
    from flan_jax.eval import report as report_lib
    assert "Nothing was cut" in report_lib.markdown({**nothing_cut, "tasks": {"only_test": nothing_cut["tasks"]["only_test"]}})


def test_predictions_keep_the_generation_and_the_extracted_answer(registered_task, tmp_path):
    from flan_jax import data

    cot = registered_task.replace(name="eval_test_cot", eval_templates=[("held-out {q}", "{a}")], answer="answer:")
    data.register_task(cot, replace=True)
    try:
        config = _config()
        config.eval.mixtures = (cot.name,)
        config.eval.extra_metrics = ()

        def generate(model, prompts, **kwargs):
            return [TOK.encode("i think. answer: y") + [EOS] for _ in prompts]

        results = evaluator.evaluate(BigramModel(_table()), TOK, config, workdir=str(tmp_path), step=4,
                                     generate_fn=generate)
        assert results["tasks"][cot.name]["metrics"]["exact_match"] == pytest.approx(100.0)
        record = json.loads((tmp_path / "eval" / "predictions_4.jsonl").read_text().splitlines()[0])
        assert record["generation"] == "i think. answer: y" and record["prediction"] == "y"
        assert record["template"] == "eval0" and record["scores"]["exact_match"] == 1.0
    finally:
        data.unregister(cot.name)
