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
