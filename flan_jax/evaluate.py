"""Evaluates a checkpoint of a workdir on the config's evaluation tasks and mixtures.

    python -m flan_jax.evaluate --config=configs/demo.py --workdir=DIR [--step=N]
        [--config.eval.num_shots=2] [--config.eval.mixtures='("synthetic_eval_heldout_cluster",)']

The model (architecture and parameters) and the tokenizer come from the workdir's run; the
config supplies what to evaluate and how (the `eval` section, `data.seq_len`, `data.prefix_lm`).
Without --config the run's own config (DIR/config.json) is used. Preference tasks report pair
accuracy: by the reward model's scores, or, for a DPO-family run, by the implicit reward against
the run's reference (its `checkpoint.init_from`, rebuilt). Results go to DIR/eval/
(step_<N>.json, step_<N>.md, predictions_<N>.jsonl; few-shot ones end in _<k>shot), and the
table is printed.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from flan_jax import host_memory

_CONFIG = config_flags.DEFINE_config_file("config", None, "experiment config file (default: the workdir's config)")
_WORKDIR = flags.DEFINE_string("workdir", None, "the training run's folder", required=True)
_STEP = flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the latest)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported here so that `--help` and flag errors are instant.
    from flan_jax import data
    from flan_jax.data.tokenizer import load_tokenizer
    from flan_jax.eval import report
    from flan_jax.eval.evaluator import evaluate
    from flan_jax.eval.preference import load_reference_model
    from flan_jax.train.checkpointing import load_model
    from flan_jax.train.objectives import get_objective

    model, run_config, step = load_model(_WORKDIR.value, step=_STEP.value)
    config = _CONFIG.value if _CONFIG.value is not None else run_config
    data.import_task_modules(tuple(run_config.data.get("task_modules", ())) + tuple(config.data.get("task_modules", ())))
    if not config.eval.mixtures:
        raise app.UsageError("config.eval.mixtures is empty: name the tasks or mixtures to evaluate")
    tokenizer = load_tokenizer(run_config.data, workdir=_WORKDIR.value)
    reference = None
    if getattr(get_objective(run_config), "compares_with_reference", False):  # DPO / IPO: implicit rewards
        reference = lambda: load_reference_model(run_config)  # noqa: E731
    results = evaluate(model, tokenizer, config, workdir=_WORKDIR.value, step=step, reference=reference)
    sys.stdout.write(report.markdown(results))
    stem = report.file_stem(step, int(config.eval.num_shots))
    print(f"Results written to {_WORKDIR.value}/eval/{stem}.json (+ .md, {stem.replace('step_', 'predictions_', 1)}.jsonl)")


if __name__ == "__main__":
    host_memory.reexec_with_tuned_malloc()
    logging.getLogger().setLevel(logging.INFO)
    app.run(main)
