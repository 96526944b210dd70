"""Checks of a task that fail before any training step or generation, with the bad record located.

A task definition can be wrong in ways that would otherwise surface only after a full evaluation:
a metric nobody registered, a template naming a field the records lack, a reference GSM8K
accuracy cannot compare with (no number), an answer that is none of the options (rank
classification or `AnswerChoice` could never be right). These are checked

  - when a task is registered: the definition always; a sample of the records too when they are in
    memory or `register_task(task, check=True)` asks for it (flan_jax.data.registry);
  - when a run starts: the trainer and the evaluator check every task they will use, and the
    evaluator checks every example it will score, before generating anything.

A record-level error names the task, template, file and line (or record) and field, as data errors do.
`sample_indices` spreads the sample over the split (first, last and evenly between), so a file
sorted by some property is not checked on one end only.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from flan_jax.data.errors import DataError
from flan_jax.data.metric_registry import check_metric_names, get_metric

SAMPLE_SIZE = 64  # records per split checked at registration
TRAINING_SPLITS = ("train",)  # rendered with the training templates too (targets required)


def sample_indices(count: int, size: int) -> list[int]:
    """Up to `size` indices in range(count): all of them, or evenly spaced including the first and last."""
    if count <= size:
        return list(range(count))
    if size <= 1:
        return [0][:size]
    return sorted({round(i * (count - 1) / (size - 1)) for i in range(size)})


def check_definition(task: Any) -> None:
    """What can be checked without data: metric names, and options where a metric or extractor needs them."""
    check_metric_names(task.metrics, task=task.name)
    if task.options_field is None:
        for name in task.metrics:
            if get_metric(name).needs_options:
                raise DataError(
                    f"metric {name!r} needs answer options; give the task options_field= (a record field "
                    "holding the list of options)", task=task.name,
                )
        templates = {t.name: t for t in (*task.templates, *task.eval_templates)}
        for template in templates.values():
            extractor = template.answer or task.answer
            if extractor is not None and extractor.needs_options:
                raise DataError(
                    f"answer extractor {type(extractor).__name__} maps answers to options; give the task "
                    "options_field=", task=task.name, template=template.name,
                )


def example_problem(task: Any, example: dict, metric_names: Sequence[str]) -> tuple[str, str | None] | None:
    """(message, field) when a rendered evaluation example could never be scored right, else None."""
    references_field = getattr(task, "references_field", None) or "targets"
    for name in metric_names:
        metric = get_metric(name)
        if metric.prediction == "likelihood":
            if example.get("targets") is None:
                return (
                    f"metric {name!r} scores the targets, but this record lacks a field they need "
                    "(evaluation records may omit training-only fields only for metrics scored on references)",
                    None,
                )
            continue
        problem = metric.problem(example)
        if problem:
            field = getattr(task, "options_field", None) if metric.needs_options else references_field
            return f"metric {name!r}: {problem}", field
    extractor_of = getattr(task, "answer_extractor", None)
    extractor = extractor_of(example.get("template")) if extractor_of else None
    if extractor is not None and metric_names:
        problem = extractor.check(example)
        if problem:
            return f"answer extractor {type(extractor).__name__}: {problem}", getattr(task, "options_field", None)
    return None


def check_examples(
    task: Any,
    examples: Sequence[dict],
    metric_names: Sequence[str],
    *,
    locate: Callable[[int], dict] | None = None,
) -> None:
    """Raises a located DataError for the first example that could never be scored right (counting the others).

    `locate(i)` gives example i's location as DataError keywords (file, line, record); by default
    the example's index. Several examples may come from one record (one per template).
    """
    locate = locate or (lambda i: {"record": i})
    bad = [(i, problem) for i, ex in enumerate(examples) if (problem := example_problem(task, ex, metric_names))]
    if not bad:
        return
    index, (message, field) = bad[0]
    records = {tuple(sorted(locate(i).items())) for i in range(len(examples))}
    bad_records = {tuple(sorted(locate(i).items())) for i, _ in bad}
    if len(bad_records) > 1:
        message += f" ({len(bad_records)} of the {len(records)} records checked have a problem)"
    raise DataError(message, task=task.name, template=examples[index].get("template"), field=field, **locate(index))


def check_records(task: Any, *, sample_size: int = SAMPLE_SIZE, splits: Sequence[str] | None = None) -> None:
    """Renders a sample of each split's records with the templates they will meet, and checks them as evaluation does.

    Training splits (`TRAINING_SPLITS` and the few-shot split) are rendered with the training
    templates, targets included; every split with the evaluation templates, whose examples are
    then checked against the task's metrics and answer extractor. Few-shot exemplars from another
    source or a fixed list are rendered with every template, targets included.
    """
    if not task.few_shot.from_task:  # exemplars from another file or a list: rendered whole, targets too
        exemplars = task.exemplar_records()
        for index in sample_indices(len(exemplars), sample_size):
            for template in (*task.templates, *task.eval_templates):
                task.render_record(None, index, template)
    for split in task.splits if splits is None else splits:
        records = task.records(split)
        indices = sample_indices(len(records), sample_size)
        if split in TRAINING_SPLITS or (task.few_shot.from_task and split == task.few_shot.split):
            for index in indices:
                for template in task.templates:
                    task.render_record(split, index, template, template_set="train")
        examples = [
            task.render_record(split, index, template, template_set="eval")
            for index in indices for template in task.eval_templates
        ]
        per_record = len(task.eval_templates)
        check_examples(task, examples, task.metrics, locate=lambda i: records.where(indices[i // per_record]))
