"""Aggregating per-task metrics (per cluster, per mixture, overall) and writing them to DIR/eval/.

FLAN and T0 report the *macro* average: every task counts once, whatever its number of
examples, so a large task cannot hide a weak cluster. A metric is averaged over the tasks that
report it (a cluster of classification tasks has no ROUGE-L). Perplexity is the exception: it
is never averaged (a mean of per-task perplexities is dominated by the worst task and matches no
loss); every row's perplexity is exp of that row's loss. `DEFINITIONS` is written into the
results so a reader of step_<N>.json knows which is which.

The report also says what was cut: per task, prompts truncated to fit (and by how many tokens),
references that cannot fit in `eval.max_new_tokens`, and scored sequences cut to `data.seq_len`.
"""

from __future__ import annotations

import json
import math
import pathlib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from flan_jax import atomic_write

# Column order of the Markdown table; other metrics follow alphabetically.
_PREFERRED_ORDER = ("exact_match", "rouge_l", "rank_classification", "gsm8k_accuracy", "loss", "perplexity")
_NOT_AVERAGED = ("perplexity",)  # derived from the row's loss instead

DEFINITIONS = {
    "aggregates": "clusters, mixtures and overall are macro averages over their tasks (each task counts once)",
    "loss": "per task: mean negative log-likelihood per target token (nats), pooled over the task's examples; "
            "per group: the macro average of its tasks' losses",
    "perplexity": "exp(loss) of the same row (for a group: exp of the macro-average loss, not a mean of perplexities)",
    "percentages": "accuracies, exact match and ROUGE-L are percentages (0-100)",
    "truncation": "per task: prompts cut to fit data.seq_len - eval.max_new_tokens tokens, examples with no "
                  "reference that fits in eval.max_new_tokens tokens, targets longer than that, sequences "
                  "cut to data.seq_len when scored (rank classification, loss)",
}


def perplexity(loss: float) -> float:
    return math.exp(min(loss, 700.0))  # capped: exp overflows past ~709


def macro_average(per_task: Iterable[Mapping[str, float]]) -> dict[str, float]:
    """Mean of each metric over the tasks that report it, plus `num_tasks`; perplexity = exp(mean loss)."""
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    num_tasks = 0
    for metrics in per_task:
        num_tasks += 1
        for name, value in metrics.items():
            if name in _NOT_AVERAGED:
                continue
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    averaged = {name: sums[name] / counts[name] for name in sorted(sums)}
    if "loss" in averaged:
        averaged["perplexity"] = perplexity(averaged["loss"])
    averaged["num_tasks"] = num_tasks
    return averaged


def aggregate(tasks: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """Per-cluster, per-mixture and overall macro averages of `{task: {"metrics", "cluster", "mixtures"}}`."""
    by_cluster: dict[str, list[Mapping[str, float]]] = {}
    by_mixture: dict[str, list[Mapping[str, float]]] = {}
    for result in tasks.values():
        by_cluster.setdefault(result["cluster"] or "(none)", []).append(result["metrics"])
        for mixture in result["mixtures"]:
            by_mixture.setdefault(mixture, []).append(result["metrics"])
    return {
        "clusters": {name: macro_average(group) for name, group in sorted(by_cluster.items())},
        "mixtures": {name: macro_average(group) for name, group in sorted(by_mixture.items())},
        "overall": macro_average(result["metrics"] for result in tasks.values()),
    }


def summary(results: Mapping[str, Any]) -> dict[str, float]:
    """Flat `"overall/exact_match"`-style keys (for logs, TensorBoard and `keep_best_metric`)."""
    flat = {f"overall/{k}": v for k, v in results["overall"].items() if k != "num_tasks"}
    for section, prefix in (("mixtures", "mixture"), ("clusters", "cluster")):
        for name, metrics in results[section].items():
            flat.update({f"{prefix}/{name}/{k}": v for k, v in metrics.items() if k != "num_tasks"})
    for name, result in results["tasks"].items():
        flat.update({f"task/{name}/{k}": v for k, v in result["metrics"].items()})
    return flat


def _columns(rows: Iterable[Mapping[str, float]]) -> list[str]:
    names = {name for row in rows for name in row if name not in ("num_tasks", "num_examples")}
    return [n for n in _PREFERRED_ORDER if n in names] + sorted(names - set(_PREFERRED_ORDER))


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.2f}"


def _table(title: str, first_column: str, rows: Sequence[tuple[str, Mapping[str, float]]], extra: str) -> list[str]:
    columns = _columns(metrics for _, metrics in rows)
    lines = [f"### {title}", "", "| " + " | ".join([first_column, extra, *columns]) + " |"]
    lines.append("|" + "---|" * (len(columns) + 2))
    for name, metrics in rows:
        count = metrics.get("num_tasks", metrics.get("num_examples", ""))
        lines.append("| " + " | ".join([name, str(count), *(_cell(metrics.get(c)) for c in columns)]) + " |")
    return [*lines, ""]


def markdown(results: Mapping[str, Any]) -> str:
    """Human-readable tables: overall and mixtures, clusters, then every task."""
    header = f"## Evaluation at step {results['step']} ({results['num_shots']}-shot, split {results['split']!r})"
    lines = [header, ""]
    lines += _table("Overall and per mixture (macro average over tasks)", "group", [
        ("overall", results["overall"]), *results["mixtures"].items()], "tasks")
    lines += _table("Per cluster", "cluster", list(results["clusters"].items()), "tasks")
    task_rows = [
        (f"{name} ({r['cluster']})", {**r["metrics"], "num_examples": r["num_examples"]})
        for name, r in results["tasks"].items()
    ]
    lines += _table("Per task", "task (cluster)", task_rows, "examples")
    lines += truncation_table(results)
    skipped = [(name, r["skipped_metrics"]) for name, r in results["tasks"].items() if r.get("skipped_metrics")]
    for name, reasons in skipped:
        lines += [f"- {name}: left out {', '.join(f'{m} ({why})' for m, why in reasons.items())}"]
    if skipped:
        lines.append("")
    lines.append(
        "Accuracies and ROUGE-L are percentages; loss is nats per target token (groups: the macro average of "
        "their tasks' losses); perplexity is exp(loss) of the same row."
    )
    return "\n".join(lines) + "\n"


_TRUNCATION_COLUMNS = (
    ("prompts_truncated", "prompts cut"),
    ("prompt_tokens_cut_mean", "tokens cut (mean)"),
    ("prompt_tokens_cut_max", "tokens cut (max)"),
    ("references_over_max_new_tokens", "no reference fits max_new_tokens"),
    ("targets_over_max_new_tokens", "targets > max_new_tokens"),
    ("ranked_examples_cut", "rank-classified cut"),
    ("loss_targets_cut", "loss sequences cut"),
)


def truncation_table(results: Mapping[str, Any]) -> list[str]:
    """Per task with anything cut: how many prompts, by how much, and what could never fit."""
    rows = []
    for name, result in results["tasks"].items():
        counts = result.get("truncation") or {}
        if any(counts.get(key) for key, _ in _TRUNCATION_COLUMNS):
            cells = [_count_cell(counts.get(key)) for key, _ in _TRUNCATION_COLUMNS]
            rows.append(f"| {name} | {result['num_examples']} | " + " | ".join(cells) + " |")
    if not rows:
        return ["### Truncation", "", "Nothing was cut: every prompt, reference and scored sequence fit.", ""]
    budget = next((r["truncation"]["max_prompt_tokens"] for r in results["tasks"].values()
                   if "max_prompt_tokens" in r.get("truncation", {})), None)
    header = "| task | examples | " + " | ".join(title for _, title in _TRUNCATION_COLUMNS) + " |"
    note = f" (generation prompts keep at most {budget} tokens)" if budget is not None else ""
    return ["### Truncation" + note, "", header, "|" + "---|" * (len(_TRUNCATION_COLUMNS) + 2), *rows, ""]


def _count_cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def file_stem(step: int, num_shots: int = 0) -> str:
    """"step_<N>" for zero-shot results, "step_<N>_<k>shot" for k-shot ones (so both can sit side by side)."""
    return f"step_{step}" if num_shots == 0 else f"step_{step}_{num_shots}shot"


def write(workdir: str | pathlib.Path, step: int, results: Mapping[str, Any], predictions: Iterable[Mapping]) -> pathlib.Path:
    """Writes DIR/eval/step_<N>.json, step_<N>.md and predictions_<N>.jsonl; returns the folder.

    Few-shot results get a `_<k>shot` suffix (step_<N>_<k>shot.json, predictions_<N>_<k>shot.jsonl),
    so a zero-shot and a few-shot evaluation of the same checkpoint do not overwrite each other.
    Files are written atomically (flan_jax/atomic_write.py: temporary file, fsync, rename), so a
    reader or a crash never leaves half a file.
    """
    folder = pathlib.Path(workdir) / "eval"
    folder.mkdir(parents=True, exist_ok=True)
    stem = file_stem(step, int(results.get("num_shots", 0)))
    outputs = {
        f"{stem}.json": json.dumps(results, indent=2, sort_keys=False) + "\n",
        f"{stem}.md": markdown(results),
        f"{stem.replace('step_', 'predictions_', 1)}.jsonl": "".join(
            json.dumps(p, ensure_ascii=False) + "\n" for p in predictions
        ),
    }
    for name, text in outputs.items():
        atomic_write.write_text(folder / name, text)
    return folder
