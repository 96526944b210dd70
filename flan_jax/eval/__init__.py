"""flan_jax.eval: FLAN-style evaluation of a model on registered tasks and mixtures.

    from flan_jax.eval import evaluate
    results = evaluate(model, tokenizer, config, workdir=DIR, step=N)   # also writes DIR/eval/
    results["overall"]["exact_match"], results["clusters"], results["tasks"]["my_task"]["metrics"]

Modules, one job each:
  metrics    text metrics as the official scorers define them (SNI exact match / ROUGE-L, GSM8K)
  scoring    target log-likelihoods in packed batches: per-task loss, rank classification
  evaluator  which examples, batched generation and scoring across tasks, per-task results
  report     macro averages per cluster / mixture / overall and the files under DIR/eval/
"""

from flan_jax.eval.evaluator import evaluate, generate_texts
from flan_jax.eval.metrics import GENERATION_METRICS, KNOWN_METRICS, normalize_answer

__all__ = ["GENERATION_METRICS", "KNOWN_METRICS", "evaluate", "generate_texts", "normalize_answer"]
