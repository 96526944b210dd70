"""flan_jax.eval: FLAN-style evaluation of a model on registered tasks and mixtures.

    from flan_jax.eval import evaluate
    results = evaluate(model, tokenizer, config, workdir=DIR, step=N)   # also writes DIR/eval/
    results["overall"]["exact_match"], results["clusters"], results["tasks"]["my_task"]["metrics"]

Modules, one job each:
  metrics    text metrics as the official scorers define them (SNI exact match / ROUGE-L, GSM8K),
             registered by name in flan_jax.data's metric registry
  scoring    target log-likelihoods in packed batches: per-task loss, rank classification
  evaluator  which examples, checks before generating, batched generation and scoring, per-task results
  report     macro averages per cluster / mixture / overall, truncation counts, the files under DIR/eval/

Attributes are imported on first use, so `flan_jax.eval.metrics` (which task definitions need, to
check metric names) does not pull in the model code.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "evaluate": "flan_jax.eval.evaluator",
    "generate_texts": "flan_jax.eval.evaluator",
    "metric_names": "flan_jax.eval.metrics",
    "normalize_answer": "flan_jax.eval.metrics",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'flan_jax.eval' has no attribute {name!r}")
