"""The demo's report: read back from the eval files the trainer writes (the run itself is
covered by tests/test_train_loop.py on the same config, shrunk)."""

import json

from flan_jax.cli import demo


def _results(em_seen, em_heldout, rank):
    return {
        "mixtures": {
            "synthetic_eval_seen_heldout_templates": {"exact_match": em_seen, "rank_classification": rank, "loss": 2.0},
            "synthetic_eval_heldout_cluster": {"exact_match": em_heldout, "loss": 4.0},
        },
        "clusters": {"arithmetic": {"exact_match": em_seen, "loss": 2.0}, "extraction": {"exact_match": em_heldout, "loss": 4.0}},
        "tasks": {
            "synthetic.addition.heldout_templates": {"cluster": "arithmetic", "mixtures": ["synthetic_eval_seen_heldout_templates"]},
            "synthetic.extract_city": {"cluster": "extraction", "mixtures": ["synthetic_eval_heldout_cluster"]},
        },
    }


def test_comparison_table_shows_untrained_to_tuned_per_question_and_cluster():
    table = demo.comparison_table(_results(0.0, 0.0, 50.0), _results(18.7, 5.8, 69.4))
    lines = table.splitlines()
    assert lines[2] == "| (a) seen tasks, held-out templates | 1 | 0.0 -> 18.7 | 50.0 -> 69.4 | 2.0 -> 2.0 |"
    assert lines[3] == "| (b) held-out cluster | 1 | 0.0 -> 5.8 | - | 4.0 -> 4.0 |"
    assert "| cluster `extraction` | 1 | 0.0 -> 5.8 | - | 4.0 -> 4.0 |" in lines


def test_sample_generations_come_from_the_predictions_file(tmp_path):
    (tmp_path / "eval").mkdir()
    records = [
        {"task": "synthetic.addition.heldout_templates", "inputs": "Add 2 and 2.", "prediction": "4", "references": ["4"]},
        {"task": "synthetic.extract_city", "inputs": "Text: Ann lives in Oslo.\nCity?", "prediction": "Rome", "references": ["Oslo"]},
    ]
    (tmp_path / "eval" / "predictions_5.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    text = demo.sample_generations(tmp_path, 5)
    seen, heldout = text.split("--- (b) held-out cluster")
    assert "[synthetic.addition.heldout_templates]" in seen and "prediction: '4'" in seen
    assert "prompt:     Text: Ann lives in Oslo. | City?" in heldout and "reference:  'Oslo'" in heldout


def _pair_results(logprob_a, logprob_b, implicit_a=None, implicit_b=None):
    mixtures = {}
    for name, logprob, implicit in (("synthetic_pairs_eval_seen_heldout_templates", logprob_a, implicit_a),
                                    ("synthetic_pairs_eval_heldout_cluster", logprob_b, implicit_b)):
        mixtures[name] = {"logprob_accuracy": logprob, **({"pair_accuracy": implicit} if implicit is not None else {})}
    return {"mixtures": mixtures}


def test_preference_stage_table_puts_untrained_sft_and_dpo_side_by_side():
    from flan_jax.cli import demo_preference

    dpo = _results(20.0, 6.0, 71.0)
    dpo["mixtures"].update(_pair_results(88.0, 61.0, 90.0, 55.5)["mixtures"])
    table = demo_preference.stage_table(
        _results(0.0, 0.0, 50.0), _results(18.7, 5.8, 69.4), dpo, _pair_results(49.0, 50.0), _pair_results(80.0, 58.0)
    ).splitlines()
    assert table[2] == "| untrained | 0.0 | 50.0 | 0.0 | - | 49.0 | 50.0 | - | - |"
    assert table[3] == "| SFT | 18.7 | 69.4 | 5.8 | - | 80.0 | 58.0 | - | - |"
    assert table[4] == "| SFT + DPO | 20.0 | 71.0 | 6.0 | - | 88.0 | 61.0 | 90.0 | 55.5 |"


def test_dpo_demo_config_trains_the_demo_model_from_the_sft_workdir():
    from flan_jax.cli import demo_config, demo_preference

    sft = demo_config.get_config()
    sft.eval.max_examples_per_task = 3  # an override of the SFT stage carries over
    config = demo_preference.load_dpo_config(sft, "/runs/x", num_steps=7)
    assert config.checkpoint.init_from == "/runs/x" and config.train.num_steps == 7
    assert config.objective.name == "dpo" and config.data.train_mixture == "synthetic_pairs_train"
    assert config.model.to_dict() == sft.model.to_dict() and config.data.tokenizer.path == ""
    assert config.eval.max_examples_per_task == 3 and sft.objective.name == "sft"  # the SFT config is left as it was


def test_configs_dpo_demo_is_the_packaged_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("dpo_demo_cfg", demo.DEMO_CONFIG.parents[2] / "configs" / "dpo_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from flan_jax.cli import dpo_demo_config

    assert module.get_config("w").to_dict() == dpo_demo_config.get_config("w").to_dict()


def test_rl_stage_table_has_one_row_per_stage(tmp_path):
    from flan_jax.cli import demo_rl

    table = demo_rl.stage_table([("SFT", _results(18.7, 5.8, 69.4)), ("SFT + GRPO", _results(24.0, 7.5, 70.0))]).splitlines()
    assert table[2] == "| SFT | 18.7 | 69.4 | 5.8 | - |"
    assert table[3] == "| SFT + GRPO | 24.0 | 70.0 | 7.5 | - |"
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps({"step": s, "reward": r}) + "\n" for s, r in enumerate([0.1, 0.2, 0.3, 0.5])))
    assert demo_rl.training_reward(tmp_path, last=2) == (0.15000000000000002, 0.4)


def test_grpo_demo_config_trains_the_demo_model_from_the_sft_workdir_on_its_own_metric():
    from flan_jax.cli import demo_config, demo_rl

    sft = demo_config.get_config()
    sft.eval.max_examples_per_task = 3  # an override of the SFT stage carries over
    config = demo_rl.load_grpo_config(sft, "/runs/x", num_steps=7, seed=3)
    assert config.checkpoint.init_from == "/runs/x" and config.train.num_steps == 7 and config.seed == 3
    assert config.objective.name == "grpo" and config.rl.rewards == ("task_metric",)
    assert config.data.train_mixture == sft.data.train_mixture  # the seen tasks, training templates
    assert config.eval.mixtures == tuple(demo.QUESTIONS)  # evaluated like the SFT run: held-out templates and cluster
    assert config.eval.max_examples_per_task == 3 and sft.objective.name == "sft"  # the SFT config is left as it was
    assert config.model.to_dict() == sft.model.to_dict() and config.data.tokenizer.path == ""
    assert config.data.batch_size % config.rl.group_size == 0


def test_configs_grpo_demo_is_the_packaged_config():
    import importlib.util

    spec = importlib.util.spec_from_file_location("grpo_demo_cfg", demo.DEMO_CONFIG.parents[2] / "configs" / "grpo_demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    from flan_jax.cli import grpo_demo_config

    assert module.get_config("w").to_dict() == grpo_demo_config.get_config("w").to_dict()
