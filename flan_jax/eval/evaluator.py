"""`evaluate(model, tokenizer, config, workdir=, step=)`: FLAN-style evaluation of every task of config.eval.mixtures.

For each task: take at most `config.eval.max_examples_per_task` examples of `config.eval.split`
(or "test" when the task has no such split), rendered zero- or few-shot (`config.eval.num_shots`)
from the task's own definition, then compute the metrics the task lists (`task.metrics`) plus
`config.eval.extra_metrics`:

  exact_match, rouge_l, gsm8k_accuracy   greedy generation, scored by flan_jax.eval.metrics
  rank_classification                    every option scored by log-likelihood, no generation
  loss (and perplexity)                  mean NLL per target token

Work is batched across tasks, not per task: all prompts of all tasks are generated together
(sorted by length, fixed batch shape), and all options and targets of all tasks are scored in
one packed pass, so a small model on a CPU evaluates twenty tasks in seconds.

Results (per task, per cluster, per mixture, overall; see flan_jax.eval.report) are returned and
written to DIR/eval/step_<N>.json, step_<N>.md and predictions_<N>.jsonl (few-shot: step_<N>_<k>shot.*).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax

from flan_jax.eval import metrics as metrics_lib
from flan_jax.eval import report, scoring

GenerateFn = Callable[..., list[list[int]]]


@dataclasses.dataclass
class _TaskData:
    """One task to evaluate: its definition, examples and the results gathered for them."""

    task: Any
    mixtures: list[str]
    split: str
    examples: list[dict]
    metric_names: list[str]
    predictions: list[str] | None = None
    rank_results: list[scoring.RankResult] | None = None
    loss: dict[str, float] | None = None


def _lookup(name: str):
    from flan_jax import data  # imported lazily: tasks/ is registered on first lookup

    return data.get(name)


def _tasks_of(name: str) -> list[Any]:
    """The tasks behind a task or mixture name (nested mixtures flattened, order kept)."""
    entry = _lookup(name)
    members = getattr(entry, "tasks", None)
    if members is None:
        return [entry]
    tasks = []
    for member in members:
        if isinstance(member, str):
            tasks.extend(_tasks_of(member))
        elif getattr(member, "tasks", None) is not None:
            tasks.extend(_tasks_of(member.name))
        else:
            tasks.append(member)
    return tasks


def _has_split(task, split: str) -> bool:
    splits = getattr(task, "splits", None)
    return splits is None or split in splits


def _load_examples(task, split: str, *, limit: int, num_shots: int, seed: int) -> tuple[str, list[dict]]:
    if not _has_split(task, split):
        if not _has_split(task, "test"):
            raise ValueError(
                f"eval: task {task.name!r} has neither a {split!r} nor a 'test' split (it has {list(task.splits)}); "
                "set config.eval.split or leave the task out of config.eval.mixtures"
            )
        logging.info("eval: task %s has no %r split; using 'test'", task.name, split)
        split = "test"
    dataset = task.get_dataset(split, seed=seed, shuffle=False, template_set="eval", num_shots=num_shots)
    count = min(len(dataset), limit) if limit > 0 else len(dataset)
    return split, [dataset[i] for i in range(count)]


def _collect(config) -> list[_TaskData]:
    ev = config.eval
    by_name: dict[str, _TaskData] = {}
    for mixture in ev.mixtures:
        for task in _tasks_of(mixture):
            if task.name in by_name:
                if mixture not in by_name[task.name].mixtures:
                    by_name[task.name].mixtures.append(mixture)
                continue
            # A task without metrics has no references (e.g. MT-bench): its answers are generated
            # and written to the predictions for a judge, and no metric (not even loss) is made up.
            names = list(dict.fromkeys([*task.metrics, *ev.extra_metrics])) if task.metrics else []
            metrics_lib.check_metric_names(names, task=task.name)
            split, examples = _load_examples(
                task, ev.split, limit=ev.max_examples_per_task, num_shots=ev.num_shots, seed=config.seed
            )
            if not examples:
                raise ValueError(f"eval: task {task.name!r} has no examples in split {split!r}")
            by_name[task.name] = _TaskData(task, [mixture], split, examples, names)
    if not by_name:
        raise ValueError("config.eval.mixtures names no task to evaluate")
    return list(by_name.values())


def _default_generate() -> GenerateFn:
    from flan_jax.model.generate import generate

    return generate


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    max_new_tokens: int,
    max_len: int,
    batch_size: int,
    generate_fn: GenerateFn | None = None,
) -> list[str]:
    """Greedy continuations of `prompts`, generated in fixed-size batches of similar lengths.

    Prompts are sorted by token length so each batch pads little, and the last batch is filled
    up with copies of its last prompt so every call has the same batch shape (no recompiles).
    Prompts longer than `max_len - max_new_tokens` lose the middle of their instruction.
    """
    generate_fn = generate_fn or _default_generate()
    encoded = [
        scoring.cut_prompt([tokenizer.bos_id, *ids], max(max_len - max_new_tokens, 1))
        for ids in tokenizer.encode_batch(list(prompts))
    ]
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    texts: list[str] = [""] * len(encoded)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        batch = [encoded[i] for i in chunk]
        batch += [batch[-1]] * (batch_size - len(batch))
        outputs = generate_fn(
            model, batch, max_new_tokens=max_new_tokens, eos_id=tokenizer.eos_id, pad_id=tokenizer.pad_id,
            temperature=0.0,
        )
        for i, output in zip(chunk, outputs):
            output = list(output)
            if tokenizer.eos_id in output:
                output = output[: output.index(tokenizer.eos_id)]
            texts[i] = tokenizer.decode(output).strip()
    return texts


def _task_metrics(item: _TaskData) -> dict[str, float]:
    values: dict[str, float] = {}
    references = [ex.get("references") or [ex["targets"]] for ex in item.examples]
    for name in item.metric_names:
        if name in metrics_lib.GENERATION_METRICS:
            values[name] = metrics_lib.mean_generation_metric(name, item.predictions, references)
        elif name == "rank_classification":
            correct = 0.0
            for index, (ex, refs, result) in enumerate(zip(item.examples, references, item.rank_results)):
                if not any(metrics_lib.exact_match(option, refs) for option in ex["options"]):
                    # Otherwise the example could never be right and would silently lower the accuracy.
                    raise ValueError(
                        f"eval: task {item.task.name!r} example {index}: no answer option {ex['options']} "
                        f"matches the references {refs}"
                    )
                correct += metrics_lib.exact_match(ex["options"][result.choice], refs)
            values[name] = 100.0 * correct / len(item.examples)
        elif name == "loss":
            values.update(item.loss)
    return values


def _prediction_records(item: _TaskData) -> list[dict]:
    records = []
    for i, ex in enumerate(item.examples):
        # "prediction": the generated text, else the option rank classification chose, else None
        # (a task scored by its loss only generates nothing).
        record = {"task": item.task.name, "inputs": ex["inputs"], "prediction": None}
        if item.predictions is not None:
            record["prediction"] = item.predictions[i]
        if item.rank_results is not None:
            record["rank_prediction"] = ex["options"][item.rank_results[i].choice]
            if record["prediction"] is None:
                record["prediction"] = record["rank_prediction"]
            record["option_scores"] = list(item.rank_results[i].scores)
        record["references"] = list(ex.get("references") or [ex["targets"]])
        if ex.get("options"):
            record["options"] = list(ex["options"])
        records.append(record)
    return records


def _split_back(flat: Sequence, items: Sequence[_TaskData]):
    """Cuts a list built from all items' examples (in order) back into one slice per item."""
    offset = 0
    for item in items:
        yield item, flat[offset:offset + len(item.examples)]
        offset += len(item.examples)


def _generate_all(model, tokenizer, config, items: Sequence[_TaskData], generate_fn: GenerateFn | None) -> None:
    """Greedy generations for every task with a text metric or none at all, batched across tasks."""
    items = [
        it for it in items
        if not it.metric_names or any(m in metrics_lib.GENERATION_METRICS for m in it.metric_names)
    ]
    if not items:
        return
    texts = generate_texts(
        model, tokenizer, [ex["inputs"] for it in items for ex in it.examples],
        max_new_tokens=config.eval.max_new_tokens, max_len=int(config.data.seq_len),
        batch_size=config.eval.batch_size, generate_fn=generate_fn,
    )
    for item, predictions in _split_back(texts, items):
        item.predictions = predictions


def _rank_all(model, tokenizer, config, items: Sequence[_TaskData]) -> None:
    """Rank classification of all options of all tasks in one packed pass."""
    if not items:
        return
    results = scoring.rank_classify(
        model, tokenizer, [ex for it in items for ex in it.examples], max_len=int(config.data.seq_len),
        batch_rows=config.eval.batch_size, prefix_lm=bool(config.data.prefix_lm),
        length_normalized=config.eval.length_normalized_options,
    )
    for item, rank_results in _split_back(results, items):
        item.rank_results = rank_results


def _loss_all(model, tokenizer, config, items: Sequence[_TaskData]) -> None:
    """Per-task loss on the reference targets, all tasks in one packed pass."""
    if not items:
        return
    sequences = scoring.target_sequences(tokenizer, [ex for it in items for ex in it.examples])
    scores = scoring.score_targets(
        model, sequences, max_len=int(config.data.seq_len), batch_rows=config.eval.batch_size,
        prefix_lm=bool(config.data.prefix_lm),
    )
    for item, task_scores in _split_back(scores, items):
        item.loss = scoring.mean_loss(task_scores)


def evaluate(
    model,
    tokenizer,
    config,
    *,
    workdir: str | None,
    step: int,
    generate_fn: GenerateFn | None = None,
) -> dict[str, Any]:
    """Evaluates `model` on config.eval.mixtures; writes DIR/eval/ files (unless workdir is None).

    Returns the results dict written to step_<N>.json: `tasks`, `clusters`, `mixtures`,
    `overall` and a flat `summary` ("overall/exact_match", "cluster/<c>/<m>", ...).
    `generate_fn` replaces flan_jax.model.generate.generate (same signature) for other models.
    """
    ev = config.eval
    start_time = time.perf_counter()
    items = _collect(config)
    _generate_all(model, tokenizer, config, items, generate_fn)
    _rank_all(model, tokenizer, config, [it for it in items if "rank_classification" in it.metric_names])
    _loss_all(model, tokenizer, config, [it for it in items if "loss" in it.metric_names])

    tasks = {
        it.task.name: {
            "cluster": getattr(it.task, "cluster", "") or "",
            "mixtures": it.mixtures,
            "split": it.split,
            "num_examples": len(it.examples),
            "metrics": _task_metrics(it),
        }
        for it in items
    }
    results: dict[str, Any] = {
        "step": int(step),
        "split": ev.split,
        "num_shots": int(ev.num_shots),
        "seconds": 0.0,
        "tasks": tasks,
        **report.aggregate(tasks),
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
    }
    results["summary"] = report.summary(results)
    results["seconds"] = round(time.perf_counter() - start_time, 3)
    if workdir is not None and jax.process_index() == 0:
        predictions = [record for it in items for record in _prediction_records(it)]
        folder = report.write(workdir, step, results, predictions)
        logging.info("eval: step %d written to %s in %.1fs", step, folder, results["seconds"])
    return results
