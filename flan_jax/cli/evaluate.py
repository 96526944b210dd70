"""Evaluates a checkpoint of a workdir on the config's evaluation tasks and mixtures.

    python -m flan_jax.evaluate --config=configs/demo.py --workdir=DIR [--step=N]
        [--config.eval.num_shots=2] [--config.eval.mixtures='("synthetic_eval_heldout_cluster",)']

The model (architecture and parameters) and the tokenizer come from the workdir's run; the
config supplies what to evaluate and how (the `eval` section, `data.seq_len`, `data.prefix_lm`).
Without --config the config saved in the evaluated checkpoint (DIR/checkpoints/<N>/config) is
used, i.e. the one the run was trained with at that step. Results go to DIR/eval/
(step_<N>.json, step_<N>.md, predictions_<N>.jsonl; few-shot ones end in _<k>shot), and the
table is printed. A `--step` that is not (or no longer: `checkpoint.keep`) in the workdir, or a
checkpoint that fails its checksums, exits with status 4 and says so.
"""

from __future__ import annotations

import logging
import sys

from absl import app, flags
from ml_collections import config_flags

from flan_jax import cli, host_memory

_FLAGS: dict = {}


def define_flags() -> None:
    _FLAGS["config"] = config_flags.DEFINE_config_file("config", None, "experiment config file (default: the checkpoint's own config)")
    _FLAGS["workdir"] = flags.DEFINE_string("workdir", None, "the training run's folder", required=True)
    _FLAGS["step"] = flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the latest)")


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    # Imported here so that `--help` and flag errors are instant.
    from flan_jax import data
    from flan_jax.data.tokenizer import load_tokenizer
    from flan_jax.eval import report
    from flan_jax.eval.evaluator import evaluate
    from flan_jax.train import exit_codes, integrity
    from flan_jax.train.checkpointing import load_model

    workdir = _FLAGS["workdir"].value
    try:
        model, run_config, step = load_model(workdir, step=_FLAGS["step"].value)
    except (FileNotFoundError, integrity.ChecksumMismatchError) as error:  # a removed or corrupt checkpoint
        logging.error("%s", error)
        sys.exit(int(exit_codes.ExitCode.NO_USABLE_CHECKPOINT))
    config = _FLAGS["config"].value if _FLAGS["config"].value is not None else run_config
    data.import_task_modules(tuple(run_config.data.get("task_modules", ())) + tuple(config.data.get("task_modules", ())))
    if not config.eval.mixtures:
        raise app.UsageError("config.eval.mixtures is empty: name the tasks or mixtures to evaluate")
    tokenizer = load_tokenizer(run_config.data, workdir=workdir)
    results = evaluate(model, tokenizer, config, workdir=workdir, step=step)
    sys.stdout.write(report.markdown(results))
    stem = report.file_stem(step, int(config.eval.num_shots))
    print(f"Results written to {workdir}/eval/{stem}.json (+ .md, {stem.replace('step_', 'predictions_', 1)}.jsonl)")


def run() -> None:
    host_memory.reexec_with_tuned_malloc()
    logging.getLogger().setLevel(logging.INFO)
    cli.define_main_flags(define_flags)
    app.run(main)


if __name__ == "__main__":
    run()
