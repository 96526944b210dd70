"""`evaluate(model, tokenizer, config, workdir=, step=)`: FLAN-style evaluation of every task of config.eval.mixtures.

For each task: take at most `config.eval.max_examples_per_task` examples of `config.eval.split`
(or "test" when the task has no such split), rendered zero- or few-shot (`config.eval.num_shots`)
from the task's own definition, then compute the metrics the task lists (`task.metrics`) plus
`config.eval.extra_metrics`, each looked up in the metric registry (flan_jax.data.metric_registry):

  generation metrics (exact_match, rouge_l, gsm8k_accuracy, a user's)   greedy generation; the
      task's answer extractor (`answer=`, e.g. the text after "So the answer is") reads the answer,
      which the metric scores
  rank_classification     every option scored by log-likelihood, no generation
  loss (and perplexity)   mean NLL per target token
  pair_accuracy, pair_margin, logprob_accuracy   preference tasks (data.PreferenceTask): both responses
      of each held-out pair scored by the reward model, the DPO implicit reward or the log-prob
      (flan_jax.eval.preference)

Before anything is generated, every example is checked (flan_jax.data.checks): a reference a metric
cannot score or an answer that is none of the options fails with the record's file and line. An
extra metric that cannot apply to a task (loss without targets) is left out of it, logged and
listed under the task's `skipped_metrics`. Prompts cut to fit `data.seq_len - eval.max_new_tokens` (T5: `data.seq_len`),
references longer than `eval.max_new_tokens` and scored sequences cut to `data.seq_len` are counted
per task (`truncation` in the results, a table in the report) and warned about before generating.

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

from flan_jax.data import chat_features, checks, converters
from flan_jax.data.converters import DECODER
from flan_jax.data.metric_registry import Metric, check_metric_names, get_metric
from flan_jax.eval import preference, report, scoring

GenerateFn = Callable[..., list[list[int]]]


@dataclasses.dataclass
class _TaskData:
    """One task to evaluate: its definition, examples and the results gathered for them."""

    task: Any
    mixtures: list[str]
    split: str
    examples: list[dict]
    metric_names: list[str]
    skipped_metrics: dict[str, str] = dataclasses.field(default_factory=dict)  # extra metric -> why not here
    generations: list[str] | None = None  # raw greedy generations
    answers: list[str] | None = None  # what the generation metrics score (the extracted answers)
    rank_results: list[scoring.RankResult] | None = None
    loss: dict[str, float] | None = None
    preference: dict[str, float] | None = None  # a preference task's pair metrics
    scores: dict[str, list[float]] = dataclasses.field(default_factory=dict)  # metric -> per-example scores
    truncation: dict[str, float] = dataclasses.field(default_factory=dict)
    prompt_cuts: list[int] | None = None  # tokens cut from each generation prompt

    def metrics_of(self, prediction: str) -> list[Metric]:
        return [m for m in map(get_metric, self.metric_names) if m.prediction == prediction]


def _lookup(name: str):
    from flan_jax import data  # imported lazily (the registry holds what config.data.task_modules registered)

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


def _locator(task, split: str) -> Callable[[int], dict]:
    """Example i -> its record's location (unshuffled, one epoch: example i is record i of the split)."""
    records_of = getattr(task, "records", None)
    if records_of is None:
        return lambda i: {"record": i}
    records = records_of(split)
    return records.where


def _inapplicable_extras(task, examples: Sequence[dict], extras: Sequence[str]) -> dict[str, str]:
    """Extra metrics (config.eval.extra_metrics) this task cannot have, with the reason."""
    skipped = {}
    for name in extras:
        if name in task.metrics:
            continue  # the task asked for it itself: a problem is an error, raised by the checks
        metric = get_metric(name)
        without_targets = sum(ex.get("targets") is None for ex in examples)
        if metric.prediction == "likelihood" and without_targets:
            skipped[name] = (
                f"{without_targets} of {len(examples)} examples have no targets (their records lack fields only the "
                "targets use); they are scored on their references"
            )
        elif metric.needs_options and not all(ex.get("options") for ex in examples):
            skipped[name] = "the task has no answer options"
    return skipped


def _collect(config) -> list[_TaskData]:
    """Every task to evaluate with its examples, each example checked before anything is generated."""
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
            if preference.is_preference_task(task):  # its pair metrics only (flan_jax.eval.preference)
                names = list(task.metrics)
            check_metric_names(names, task=task.name)
            split, examples = _load_examples(
                task, ev.split, limit=ev.max_examples_per_task, num_shots=ev.num_shots, seed=config.seed
            )
            if not examples:
                raise ValueError(f"eval: task {task.name!r} has no examples in split {split!r}")
            skipped = _inapplicable_extras(task, examples, [n for n in names if n not in task.metrics])
            for name, reason in skipped.items():
                logging.warning("eval: task %s: extra metric %r left out: %s", task.name, name, reason)
            names = [n for n in names if n not in skipped]
            checks.check_examples(task, examples, names, locate=_locator(task, split))
            by_name[task.name] = _TaskData(task, [mixture], split, examples, names, skipped)
    if not by_name:
        raise ValueError("config.eval.mixtures names no task to evaluate")
    return list(by_name.values())


def check(config) -> None:
    """Everything `evaluate` checks before generating (tasks, metrics, every example), without a model.

    The trainer calls it when a run starts, so a bad evaluation task fails before the first step.
    """
    _collect(config)


def _default_generate() -> GenerateFn:
    from flan_jax.model.generate import generate

    return generate


def prompt_budget(max_len: int | tuple[int, ...], max_new_tokens: int, converter: Any = DECODER) -> int:
    """Prompt tokens that fit in the model family's rows (`max_len`: its converter's row shape): a
    decoder's prompt (BOS included) before `max_new_tokens` generated ones; T5's encoder row."""
    return converter.prompt_budget(max_len, max_new_tokens)


def encode_prompts(
    tokenizer, prompts: Sequence[str | Sequence[dict]], max_tokens: int, converter: Any = DECODER
) -> tuple[list[list[int]], list[int]]:
    """The tokens each prompt conditions on in the family's layout, cut in the middle to
    `max_tokens`; and how many tokens each lost.

    A decoder's BOS + the prompt's tokens; or, for a conversation (a messages task's) or any prompt
    when the tokenizer renders chats (`config.data.tokenizer.chat_template`), the chat template's
    rendering with its generation prompt, as in training (data/chat_features.py). T5: the tokens + EOS.
    """
    if all(isinstance(p, str) for p in prompts) and not chat_features.renders_chats(tokenizer):
        # one native call for all prompts
        full_prompts = [converter.prompt_from_ids(tokenizer, ids) for ids in tokenizer.encode_batch(list(prompts))]
    else:
        full_prompts = [converter.prompt_ids(tokenizer, prompt) for prompt in prompts]
    encoded, cut = [], []
    for full in full_prompts:
        kept = converter.cut_prompt(full, max_tokens)
        encoded.append(kept)
        cut.append(len(full) - len(kept))
    return encoded, cut


def _generate_encoded(model, tokenizer, encoded, *, max_new_tokens, batch_size, generate_fn) -> list[str]:
    generate_fn = generate_fn or _default_generate()
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


def generate_texts(
    model,
    tokenizer,
    prompts: Sequence[str | Sequence[dict]],
    *,
    max_new_tokens: int,
    max_len: int | tuple[int, ...],
    batch_size: int,
    generate_fn: GenerateFn | None = None,
) -> list[str]:
    """Greedy continuations of `prompts`, generated in fixed-size batches of similar lengths.

    Prompts are sorted by token length so each batch pads little, and the last batch is filled
    up with copies of its last prompt so every call has the same batch shape (no recompiles).
    The prompt layout is the model family's (its feature converter); `max_len` is that converter's
    row shape (a decoder's seq_len). Prompts longer than the budget (a decoder: `max_len -
    max_new_tokens`; T5: its encoder row) lose the middle of their instruction. A prompt is a
    string, or a conversation (a list of messages) rendered with the tokenizer's chat template
    (see `encode_prompts`).
    """
    converter = converters.for_model(model)
    encoded, _ = encode_prompts(tokenizer, prompts, prompt_budget(max_len, max_new_tokens, converter), converter)
    return _generate_encoded(
        model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=batch_size, generate_fn=generate_fn
    )


def _extract(task, generation: str, example: dict) -> str:
    extract = getattr(task, "extract_answer", None)
    return extract(generation, example) if extract is not None else generation


def _count_generation_truncation(item: _TaskData, tokenizer, cuts: Sequence[int], budget: int, max_new_tokens: int):
    """Per task: prompts cut (and by how much), references / targets that cannot fit in max_new_tokens."""
    cut = [c for c in cuts if c > 0]
    references = [list(ex.get("references") or []) for ex in item.examples]
    # A generation that must hold more than the answer (a rationale, say) needs room for the targets.
    targets = [ex.get("targets") for ex in item.examples]
    longer = [t for t, refs in zip(targets, references) if t is not None and t not in refs]
    lengths = iter(len(ids) for ids in tokenizer.encode_batch([r for refs in references for r in refs] + longer))
    shortest_reference = [min((next(lengths) for _ in refs), default=0) for refs in references]
    too_long_references = sum(n > max_new_tokens for n in shortest_reference)
    too_long_targets = sum(next(lengths) > max_new_tokens for _ in longer)
    item.truncation.update({
        "max_prompt_tokens": budget,
        "max_new_tokens": max_new_tokens,
        "prompts_truncated": len(cut),
        "prompt_tokens_cut_mean": sum(cut) / len(cut) if cut else 0.0,
        "prompt_tokens_cut_max": max(cut, default=0),
        "references_over_max_new_tokens": too_long_references,
        "targets_over_max_new_tokens": too_long_targets,
    })
    item.prompt_cuts = list(cuts)
    if cut or too_long_references or too_long_targets:
        n = len(item.examples)
        logging.warning(
            "eval: task %s: %d of %d prompts cut to %d tokens (by %.1f tokens on average, at most %d; raise "
            "data.seq_len or lower eval.max_new_tokens); %d of %d have no reference that fits in "
            "eval.max_new_tokens=%d tokens (they cannot match); %d of %d targets are longer than that",
            item.task.name, len(cut), n, budget, item.truncation["prompt_tokens_cut_mean"],
            item.truncation["prompt_tokens_cut_max"], too_long_references, n, max_new_tokens, too_long_targets, n,
        )


def _generate_all(model, tokenizer, config, items: Sequence[_TaskData], generate_fn: GenerateFn | None) -> None:
    """Greedy generations for every task with a generation metric or none at all, batched across tasks."""
    items = [it for it in items if not it.metric_names or it.metrics_of("generation")]
    if not items:
        return
    max_new_tokens = int(config.eval.max_new_tokens)
    converter = converters.for_model(model)
    budget = prompt_budget(_row_shape(model, config), max_new_tokens, converter)
    prompts = [chat_features.eval_prompt(ex) for it in items for ex in it.examples]
    encoded, cuts = encode_prompts(tokenizer, prompts, budget, converter)
    for item, item_cuts in _split_back(cuts, items):
        _count_generation_truncation(item, tokenizer, item_cuts, budget, max_new_tokens)
    texts = _generate_encoded(
        model, tokenizer, encoded, max_new_tokens=max_new_tokens, batch_size=config.eval.batch_size,
        generate_fn=generate_fn,
    )
    for item, generations in _split_back(texts, items):
        item.generations = generations
        item.answers = [_extract(item.task, text, ex) for text, ex in zip(generations, item.examples)]


def _task_metrics(item: _TaskData) -> dict[str, float]:
    if item.preference is not None:
        return dict(item.preference)
    values: dict[str, float] = {}
    for name in item.metric_names:
        metric = get_metric(name)
        if metric.prediction == "likelihood":
            values.update(item.loss)
            continue
        if metric.prediction == "generation":
            predictions = item.answers
        else:  # "ranked_option"
            predictions = [ex["options"][r.choice] for ex, r in zip(item.examples, item.rank_results)]
        scores = [metric.score(p, ex["references"], ex) for p, ex in zip(predictions, item.examples)]
        item.scores[name] = scores
        values[name] = metric.aggregate(scores)
    return values


def _prediction_records(item: _TaskData) -> list[dict]:
    records = []
    for i, ex in enumerate(item.examples):
        # "generation": the generated text; "prediction": what the generation metrics scored (the
        # answer read from it), else the option rank classification chose, else None (a task scored
        # by its loss only generates nothing).
        record = {"task": item.task.name, "template": ex.get("template"), "inputs": ex["inputs"], "prediction": None}
        if item.generations is not None:
            record["generation"] = item.generations[i]
            record["prediction"] = item.answers[i]
            record["prompt_tokens_cut"] = item.prompt_cuts[i]
        if item.rank_results is not None:
            record["rank_prediction"] = ex["options"][item.rank_results[i].choice]
            if record["prediction"] is None:
                record["prediction"] = record["rank_prediction"]
            record["option_scores"] = list(item.rank_results[i].scores)
        record["references"] = list(ex["references"])
        if ex.get("options"):
            record["options"] = list(ex["options"])
        if item.scores:
            record["scores"] = {name: scores[i] for name, scores in item.scores.items()}
        records.append(record)
    return records


def _row_shape(model, config):
    """The rows the model family trains on (its converter's shape of config.data): the longest
    prompts and targets the evaluation scores and generates from."""
    return scoring.row_shape(config.data, converters.for_model(model))


def _split_back(flat: Sequence, items: Sequence[_TaskData]):
    """Cuts a list built from all items' examples (in order) back into one slice per item."""
    offset = 0
    for item in items:
        yield item, flat[offset:offset + len(item.examples)]
        offset += len(item.examples)


def _rank_all(model, tokenizer, config, items: Sequence[_TaskData]) -> None:
    """Rank classification of all options of all tasks in one packed pass."""
    if not items:
        return
    results = scoring.rank_classify(
        model, tokenizer, [ex for it in items for ex in it.examples], max_len=_row_shape(model, config),
        batch_rows=config.eval.batch_size, prefix_lm=bool(config.data.prefix_lm),
        length_normalized=config.eval.length_normalized_options,
    )
    for item, rank_results in _split_back(results, items):
        item.rank_results = rank_results
        item.truncation["ranked_examples_cut"] = sum(r.truncated for r in rank_results)


def _loss_all(model, tokenizer, config, items: Sequence[_TaskData]) -> None:
    """Per-task loss on the reference targets, all tasks in one packed pass."""
    if not items:
        return
    sequences = scoring.target_sequences(tokenizer, [ex for it in items for ex in it.examples], converters.for_model(model))
    scores = scoring.score_targets(
        model, sequences, max_len=_row_shape(model, config), batch_rows=config.eval.batch_size,
        prefix_lm=bool(config.data.prefix_lm),
    )
    for item, task_scores in _split_back(scores, items):
        item.loss = scoring.mean_loss(task_scores)
        item.truncation["loss_targets_cut"] = sum(s.truncated for s in task_scores)


def _preference_all(model, tokenizer, config, items: Sequence[_TaskData], reference) -> None:
    """Pair metrics of every preference task (flan_jax.eval.preference), all pairs in one packed pass."""
    if not items:
        return
    objective = config.get("objective", {})
    results = preference.evaluate_preference_tasks(
        model, tokenizer, [it.examples for it in items], seq_len=int(config.data.seq_len),
        batch_rows=config.eval.batch_size, reference=reference,
        length_normalized=config.eval.length_normalized_options, beta=float(objective.get("beta", 1.0)),
    )
    for item, metrics in zip(items, results):
        item.preference = metrics
        item.truncation["pairs_dropped"] = metrics["pairs_dropped"]


def evaluate(
    model,
    tokenizer,
    config,
    *,
    workdir: str | None,
    step: int,
    generate_fn: GenerateFn | None = None,
    reference=None,
) -> dict[str, Any]:
    """Evaluates `model` on config.eval.mixtures; writes DIR/eval/ files (unless workdir is None).

    Returns the results dict written to step_<N>.json: `tasks`, `clusters`, `mixtures`,
    `overall` and a flat `summary` ("overall/exact_match", "cluster/<c>/<m>", ...).
    `generate_fn` replaces flan_jax.model.generate.generate (same signature) for other models.
    `reference` (a model, or a no-argument function returning one) scores preference pairs by the
    DPO implicit reward of `model` against it; without it, by reward scores or log-probs.
    """
    ev = config.eval
    start_time = time.perf_counter()
    items = _collect(config)
    _generate_all(model, tokenizer, config, items, generate_fn)
    _rank_all(model, tokenizer, config, [it for it in items if it.metrics_of("ranked_option")])
    pairs = [it for it in items if preference.is_preference_task(it.task)]
    losses = [it for it in items if it.metrics_of("likelihood") and not preference.is_preference_task(it.task)]
    _loss_all(model, tokenizer, config, losses)
    _preference_all(model, tokenizer, config, pairs, reference)

    tasks = {}
    for it in items:
        tasks[it.task.name] = {
            "cluster": getattr(it.task, "cluster", "") or "",
            "mixtures": it.mixtures,
            "split": it.split,
            "num_examples": len(it.examples),
            "metrics": _task_metrics(it),
            "truncation": it.truncation,
        }
        if it.skipped_metrics:
            tasks[it.task.name]["skipped_metrics"] = it.skipped_metrics
    results: dict[str, Any] = {
        "step": int(step),
        "split": ev.split,
        "num_shots": int(ev.num_shots),
        "seconds": 0.0,
        "tasks": tasks,
        **report.aggregate(tasks),
        "definitions": report.DEFINITIONS,
        "config": config.to_dict() if hasattr(config, "to_dict") else dict(config),
    }
    results["summary"] = report.summary(results)
    results["seconds"] = round(time.perf_counter() - start_time, 3)
    if workdir is not None and jax.process_index() == 0:
        predictions = [record for it in items for record in _prediction_records(it)]
        folder = report.write(workdir, step, results, predictions)
        logging.info("eval: step %d written to %s in %.1fs", step, folder, results["seconds"])
    return results
