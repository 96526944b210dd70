"""Tasks, mixtures and the name registry that configs look them up in.

A `Task` is a data source + templates + preprocessors + metrics + metadata. Its `get_dataset()`
returns a grain `MapDataset` of rendered examples (design.md §1): records are preprocessed once per
split (filtered counts logged), shuffled by a seed, optionally repeated (reshuffled each epoch), and
rendered lazily, per example, with a template chosen from (seed, position in the stream).

A `Mixture` combines tasks (or other mixtures) with rates: explicit numbers or FLAN's
examples-proportional rates with a cap and a temperature. Member names are resolved when the rates
are needed, so `tasks/` modules can declare mixtures before or after their tasks.
"""

from __future__ import annotations

import difflib
import importlib
import logging
import random
import re
import sys
import threading
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Union

import grain
import numpy as np

from flan_jax.data import checks, mixing
from flan_jax.data.answers import AnswerExtractor, Extractor, as_extractor
from flan_jax.data.chat import check_messages
from flan_jax.data.errors import DataError
from flan_jax.data.metric_registry import get_metric
from flan_jax.data.sources import InMemorySource, PicklableLock, Records, Source
from flan_jax.data.templates import (
    DEFAULT_OPTION_STYLES,
    OPTION_STYLES,
    OPTIONS_FIELD,
    FewShot,
    Template,
    as_templates,
    choose,
    render_options,
)

Preprocessor = Callable[[dict], Union[dict, None]]
_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.:/\-]*\Z")
_SALT_OPTIONS, _SALT_SHOTS = 1, 2


def _callable_name(fn: Callable) -> str:
    return getattr(fn, "__name__", type(fn).__name__)


def _check_name(name: str, kind: str) -> None:
    if not isinstance(name, str) or not _NAME.match(name):
        raise DataError(f"invalid {kind} name {name!r}: use letters, digits and _ . : / -")


class Task(PicklableLock):
    """A named dataset with templates; `get_dataset(split)` yields rendered example dicts.

    Args:
      name: registry name (letters, digits, `_ . : / -`).
      source: a `Source` (JsonlSource, TsvSource, FunctionSource, ...).
      templates: Template(s) or (inputs, targets) pairs used for training; one per example is chosen.
      eval_templates: templates for `template_set="eval"` (e.g. held-out wordings); default: `templates`.
      preprocessors: functions record -> record (or None to drop it); drops are counted and logged.
      metrics: names of registered metrics (`data.metric_names()`; add one with `data.register_metric`).
      cluster: task cluster/category (FLAN's held-out-cluster evaluation groups by it).
      references_field: record field (str or list of str) with acceptable answers; default [targets].
        With it, evaluation records need not carry the fields only the targets use (a CoT
        rationale): such an evaluation example has `targets` None and is scored on its references.
      options_field: record field with the answer options (list of str); templates show them
        with the `{options}` placeholder, in a style chosen per example from `option_styles`.
      few_shot: `FewShot` for `get_dataset(num_shots=k)`: format and where exemplars come from
        (the task's training split, another source or a fixed list); default `FewShot()`.
      answer: how the final answer is read from a generation before any metric (flan_jax.data.answers:
        `data.AnswerAfter()` for "So the answer is X.", `data.AnswerChoice()` for options, a marker
        string, a function); a template's own `answer` wins. None: the whole generation.
      messages_field: record field holding a conversation (a list of {"role", "content"} with roles
        system / user / assistant) for multi-turn chat SFT: the example carries it as `messages`,
        is rendered with the tokenizer's chat template and trained on every assistant turn
        (data/chat_features.py). Such a task has no templates (pass `templates=()`); for
        evaluation its prompt is the conversation before the last assistant turn, its target
        that turn.
    """

    def __init__(
        self,
        name: str,
        source: Source,
        templates: Template | tuple[str, str] | Sequence[Template | tuple[str, str]],
        *,
        eval_templates: Template | Sequence[Template | tuple[str, str]] | None = None,
        preprocessors: Sequence[Preprocessor] = (),
        metrics: Sequence[str] = ("exact_match",),
        cluster: str = "",
        references_field: str | None = None,
        options_field: str | None = None,
        option_styles: Sequence[str] = DEFAULT_OPTION_STYLES,
        few_shot: FewShot | None = None,
        description: str = "",
        answer: Extractor = None,
        messages_field: str | None = None,
    ):
        _check_name(name, "task")
        if not isinstance(source, Source):
            raise TypeError(f"task {name!r}: source must be a flan_jax.data Source, got {type(source).__name__}")
        unknown_styles = [s for s in option_styles if s not in OPTION_STYLES]
        if unknown_styles or not option_styles:
            raise DataError(f"task {name!r}: option_styles {list(option_styles)}; known: {', '.join(OPTION_STYLES)}")
        self.name = name
        self.source = source
        self.templates = as_templates(templates, "t")
        self.messages_field = messages_field
        if messages_field is not None and (self.templates or eval_templates):
            raise DataError(f"task {name!r}: a messages task (messages_field={messages_field!r}) takes no templates; "
                            "the tokenizer's chat template renders it")
        if not self.templates and messages_field is None:
            raise DataError(f"task {name!r} has no templates")
        self.eval_templates = as_templates(eval_templates, "eval") if eval_templates is not None else self.templates
        self.preprocessors = tuple(preprocessors)
        self.metrics = tuple(metrics)
        self.cluster = cluster
        self.references_field = references_field
        self.options_field = options_field
        self.option_styles = tuple(option_styles)
        self.few_shot = few_shot or FewShot()
        self.description = description
        self.answer = as_extractor(answer)
        if isinstance(metrics, str):
            raise DataError(f"task {name!r}: metrics must be a sequence of names, got the string {metrics!r}")
        self.filtered: dict[str, int] = {}  # split -> records dropped by preprocessors
        self._records_cache: dict[str, Records] = {}
        self._lock = threading.Lock()

    _FIELDS = (
        "name", "source", "templates", "eval_templates", "preprocessors", "metrics", "cluster",
        "references_field", "options_field", "option_styles", "few_shot", "description", "answer",
        "messages_field",
    )

    def replace(self, **changes: Any) -> Task:
        """A copy with some arguments changed, e.g. `task.replace(name="x_heldout", templates=other)`."""
        unknown = sorted(set(changes) - set(self._FIELDS))
        if unknown:
            raise TypeError(f"Task.replace: unknown argument(s) {unknown}; known: {', '.join(self._FIELDS)}")
        kwargs = {field: getattr(self, field) for field in self._FIELDS}
        if "templates" in changes and "eval_templates" not in changes and self.eval_templates is self.templates:
            kwargs["eval_templates"] = None  # eval templates keep following the templates
        kwargs.update(changes)
        return Task(kwargs.pop("name"), kwargs.pop("source"), kwargs.pop("templates"), **kwargs)

    # ------------------------------------------------------------------ data
    @property
    def splits(self) -> tuple[str, ...]:
        return self.source.splits

    def records(self, split: str) -> Records:
        """Preprocessed records of a split (loaded and preprocessed once, then cached)."""
        if split not in self.splits:
            raise DataError(f"no split {split!r}; available: {', '.join(self.splits)}", task=self.name)
        with self._lock:
            if split not in self._records_cache:
                self._records_cache[split] = self._preprocess(self.source, split)
            return self._records_cache[split]

    def num_examples(self, split: str) -> int:
        return len(self.records(split))

    def exemplar_records(self) -> Records:
        """The records few-shot exemplars are drawn from (`few_shot`: own split, other source or fixed list)."""
        few_shot = self.few_shot
        if few_shot.from_task:
            if few_shot.split not in self.splits:
                raise DataError(
                    f"few-shot exemplars come from split {few_shot.split!r} (FewShot.split), which this task lacks "
                    f"(it has {', '.join(self.splits)}); give few_shot=data.FewShot(split=...), source=... or "
                    "exemplars=[...]", task=self.name,
                )
            return self.records(few_shot.split)
        key = "few_shot"  # its own entry of the caches and of `filtered`
        with self._lock:
            if key not in self._records_cache:
                if few_shot.exemplars is not None:
                    source, split = InMemorySource({"exemplars": list(few_shot.exemplars)}), "exemplars"
                else:
                    source, split = few_shot.source, few_shot.split
                    if split not in source.splits:
                        raise DataError(
                            f"FewShot(source={source!r}) has no split {split!r} (set FewShot(split=...)); "
                            f"available: {', '.join(source.splits)}", task=self.name,
                        )
                self._records_cache[key] = self._preprocess(source, split, label=key)
            return self._records_cache[key]

    def _preprocess(self, source: Source, split: str, label: str | None = None) -> Records:
        """`split` of `source` through the preprocessors; drops are counted in `filtered[label or split]`."""
        label = label or split
        raw = source.records(split)
        if not self.preprocessors:
            self.filtered[label] = 0
            return raw
        kept: list[dict] = []
        kept_indices: list[int] = []
        for index, record in enumerate(raw):
            record = dict(record)  # preprocessors may modify it; the source's cache stays intact
            for preprocess in self.preprocessors:
                try:
                    record = preprocess(record)
                except Exception as error:
                    raise self._located(error, raw, index, f"preprocessor {_callable_name(preprocess)!r}") from error
                if record is None:
                    break
            if record is not None:
                kept.append(record)
                kept_indices.append(index)
        self.filtered[label] = len(raw) - len(kept)
        if self.filtered[label]:
            logging.warning(
                "task %r split %r: preprocessors dropped %d of %d records", self.name, label, self.filtered[label], len(raw)
            )
        origins = [(w["file"], w.get("line"), w["record"]) for w in map(raw.where, kept_indices)]
        return Records(kept, f"{self.name}:{label}", origins=origins)

    def _located(self, error: Exception, records: Records, index: int, stage: str) -> DataError:
        """A preprocessor's error, re-raised with task, file, line and record of the record it happened on."""
        if isinstance(error, DataError):
            error = DataError(f"{stage}: {error.bare_message}", field=error.field, template=error.template)
        else:
            error = DataError(f"{stage} failed: {error!r}")
        return _locate(error, self.name, records, index)

    def get_dataset(
        self,
        split: str,
        *,
        seed: int = 0,
        shuffle: bool = True,
        template_set: str = "train",
        num_shots: int = 0,
        num_epochs: int | None = 1,
    ) -> grain.MapDataset:
        """Rendered examples of a split: {"inputs", "targets", "task", "references", "options"}.

        `num_epochs=None` repeats forever (each epoch reshuffled); the template (and options style,
        few-shot exemplars) of stream position k is a function of (seed, k).
        """
        if template_set not in ("train", "eval"):
            raise ValueError(f"template_set must be 'train' or 'eval', got {template_set!r}")
        if num_shots < 0:
            raise ValueError(f"num_shots must be >= 0, got {num_shots}")
        if num_shots and self.messages_field is not None:
            raise DataError("few-shot exemplars are not defined for a messages task", task=self.name)
        records = self.records(split)
        templates = self.templates if template_set == "train" else self.eval_templates
        if len(records) == 0:
            if num_epochs == 1:
                return grain.MapDataset.source(records)
            raise DataError(f"split {split!r} has no examples to repeat (empty files: {self.source.empty_files})", task=self.name)
        exemplars = self.exemplar_records() if num_shots else None
        order_seed = mixing.stable_seed(seed, self.name) if shuffle else None
        exclude_self = self.few_shot.from_task and split == self.few_shot.split
        renderer = _Renderer(
            self, records, templates, seed, order_seed, num_shots, exemplars, exclude_self, template_set == "eval"
        )
        renderer.check()
        length = sys.maxsize if num_epochs is None else len(records) * num_epochs
        return grain.MapDataset.range(length).map_with_index(renderer)

    # ------------------------------------------------------------------ answers and checks
    def answer_extractor(self, template: str | None, template_set: str = "eval") -> AnswerExtractor | None:
        """How the answer is read from a generation for examples of `template` (its own, else the task's)."""
        for candidate in self.eval_templates if template_set == "eval" else self.templates:
            if candidate.name == template:
                return candidate.answer or self.answer
        return self.answer

    def extract_answer(self, generation: str, example: dict) -> str:
        """The answer a generation gives for `example` (a rendered example of this task), before any metric."""
        extractor = self.answer_extractor(example.get("template"))
        return generation.strip() if extractor is None else extractor(generation, example)

    def score(self, generation: str, example: dict) -> dict[str, float]:
        """Per-example scores of a generation under the task's generation metrics (an RL reward is one of them)."""
        answer = self.extract_answer(generation, example)
        metrics = [get_metric(name) for name in self.metrics]
        return {m.name: m.score(answer, example["references"], example) for m in metrics if m.prediction == "generation"}

    def check(self, *, sample_size: int = checks.SAMPLE_SIZE) -> None:
        """Checks the definition and a sample of every split's records (see flan_jax.data.checks); reads the data."""
        checks.check_definition(self)
        checks.check_records(self, sample_size=sample_size)

    def render_record(self, split: str | None, index: int, template: Template, *, template_set: str = "eval") -> dict:
        """Record `index` of `split` rendered with `template` (no few-shot), as get_dataset would; for checks.

        `split=None` renders few-shot exemplar `index` (targets always rendered: exemplars show them).
        """
        records = self.records(split) if split is not None else self.exemplar_records()
        for_eval = template_set == "eval" and split is not None
        renderer = _Renderer(self, records, (template,), 0, None, 0, None, False, for_eval)
        return renderer.render(index, template, self.option_styles[0])

    def __repr__(self) -> str:
        return f"Task({self.name!r}, {self.source!r}, templates={[t.name for t in self.templates]})"


def _locate(error: DataError, task: str, records: Records, index: int) -> DataError:
    """`error` with the task and the record's file/line/record number added (unless it already has a file)."""
    if error.file is not None:
        return error
    return DataError(error.bare_message, task=task, template=error.template, field=error.field, **records.where(index))


class _Renderer:
    """Renders stream position k into an example dict (a class, so grain workers can pickle it).

    Position k is record `order(k // n)[k % n]` of the split: each epoch is a fresh permutation
    (numpy's PCG64 seeded by (task seed, epoch), computed once per epoch), which costs one list
    lookup per example, unlike a per-index bijective shuffle.

    For evaluation (`for_eval`), a task with a `references_field` is scored on its references, so
    its targets are only rendered when the record has their fields: an evaluation record need not
    carry a training-only field such as a chain-of-thought rationale (its `targets` is then None).
    """

    _CHECKED_RECORDS = 8  # records `check` renders with every template (spread over the split)

    def __init__(self, task: Task, records, templates, seed, order_seed, num_shots, exemplars, exclude_self, for_eval):
        self.task_name = task.name
        self.records = records
        self.order_seed = order_seed  # None: records in file order
        self._orders: dict[int, list[int]] = {}
        self.templates = templates
        self.seed = seed
        self.options_field = task.options_field
        self.option_styles = task.option_styles
        self.references_field = task.references_field
        self.num_shots = num_shots
        self.exemplars = exemplars
        self.exclude_self = exclude_self
        self.few_shot = task.few_shot
        self.targets_optional = for_eval and task.references_field is not None
        self.messages_field = task.messages_field

    def check(self) -> None:
        """Renders a few records (first, last, evenly between) with every template, so a field typo fails
        before training starts; the error names the record's file and line."""
        for index in checks.sample_indices(len(self.records), self._CHECKED_RECORDS):
            if self.messages_field is not None:
                self._chat(self.records[index], index)
                continue
            for template in self.templates:
                self.render(index, template, self.option_styles[0])

    def _fields(self, record: dict, style: str) -> tuple[dict, list[str]]:
        if self.options_field is None:
            return record, []
        options = record.get(self.options_field)
        if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options):
            raise DataError(f"options must be a list of str, got {type(options).__name__}", field=self.options_field)
        fields = dict(record)
        fields[OPTIONS_FIELD] = render_options(options, style)
        return fields, list(options)

    def _order(self, epoch: int) -> list[int]:
        """The record order of one epoch: a fresh permutation per epoch (no repeats within an epoch).

        Grain may call the renderer from several threads: the cache dict is never mutated, only
        replaced, so readers never see it change size; a race at most computes a permutation twice.
        """
        orders = self._orders
        order = orders.get(epoch)
        if order is None:
            order = np.random.default_rng([self.order_seed, epoch]).permutation(len(self.records)).tolist()
            kept = {e: o for e, o in orders.items() if abs(e - epoch) <= 1}  # streams move forward
            kept[epoch] = order
            self._orders = kept
        return order

    def __call__(self, position: int, _: int) -> dict:
        epoch, index = divmod(position, len(self.records))
        if self.order_seed is not None:
            index = self._order(epoch)[index]
        if self.messages_field is not None:
            return self._chat(self.records[index], index)
        template = self.templates[choose(self.seed, position, len(self.templates))]
        style = self.option_styles[choose(self.seed, position, len(self.option_styles), _SALT_OPTIONS)]
        example = self.render(index, template, style)
        if self.num_shots:
            example["inputs"] = self._with_exemplars(example["inputs"], position, index, template, style)
        return example

    def render(self, index: int, template: Template, style: str) -> dict:
        """Record `index` rendered with `template` and options `style` (errors located at its file and line)."""
        record = self.records[index]
        try:
            fields, options = self._fields(record, style)
            inputs = template.render_inputs(fields, task=self.task_name)
            targets = self._targets(template, fields)
            references = self._references(record, targets)
        except DataError as error:
            raise _locate(error, self.task_name, self.records, index) from None
        return {
            "inputs": inputs, "targets": targets, "task": self.task_name, "references": references,
            "options": options, "template": template.name,
        }

    def _targets(self, template: Template, fields: dict) -> str | None:
        if self.targets_optional and not all(name in fields for name in template.targets_fields):
            return None
        return template.render_targets(fields, task=self.task_name)

    def _chat(self, record: dict, index: int) -> dict:
        """A messages record's example: the conversation, and its last assistant turn as the target."""
        try:
            messages = check_messages(record.get(self.messages_field), where=self.messages_field)
            last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
            if last is None or not any(m["content"] for m in messages if m["role"] == "assistant"):
                raise DataError("the conversation has no assistant turn with content to train on", field=self.messages_field)
        except DataError as error:
            raise _locate(DataError(error.bare_message, field=self.messages_field), self.task_name, self.records, index) from None
        prompt = [m for m in messages[:last] if m["role"] == "user"]
        targets = messages[last]["content"]
        return {"inputs": prompt[-1]["content"] if prompt else "", "targets": targets, "task": self.task_name,
                "references": self._references(record, targets), "options": [], "messages": messages}

    def _references(self, record: dict, targets: str | None) -> list[str]:
        if self.references_field is None:
            return [targets]
        value = record.get(self.references_field)
        if isinstance(value, str):
            return [value]
        if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            return list(value)
        shown = "an empty list" if isinstance(value, (list, tuple)) and not value else type(value).__name__
        raise DataError(f"references must be a str or a non-empty list of str, got {shown}", field=self.references_field)

    def _with_exemplars(self, inputs: str, position: int, index: int, template: Template, style: str) -> str:
        pool = len(self.exemplars)
        candidates = pool - 1 if self.exclude_self else pool
        k = min(self.num_shots, max(candidates, 0))
        if self.few_shot.in_order:
            drawn = list(range(k))
        else:
            rng = random.Random(choose(self.seed, position, 2**62, _SALT_SHOTS))
            drawn = rng.sample(range(candidates), k)
        if self.exclude_self:
            drawn = [i + 1 if i >= index else i for i in drawn]  # skip the query itself
        shots = []
        for i in drawn:
            try:
                fields, _ = self._fields(self.exemplars[i], style)
                shots.append(template.render(fields, task=self.task_name))
            except DataError as error:
                raise _locate(error, self.task_name, self.exemplars, i) from None
        return self.few_shot.join(shots, inputs)


# ---------------------------------------------------------------------------- mixtures

Rate = Union[float, int, Callable[[Task], float]]


class _ExamplesProportional:
    """Rate callable: min(num_examples(split), cap) ** (1 / temperature)."""

    def __init__(self, cap: int | None, temperature: float, split: str):
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if cap is not None and cap <= 0:
            raise ValueError(f"cap must be > 0, got {cap}")
        self.cap, self.temperature, self.split = cap, temperature, split

    def __call__(self, task: Task) -> float:
        n = task.num_examples(self.split) if self.split in task.splits else 0
        if self.cap is not None:
            n = min(n, self.cap)
        return float(n) ** (1.0 / self.temperature) if n > 0 else 0.0

    def __repr__(self) -> str:
        return f"examples_proportional(cap={self.cap}, temperature={self.temperature}, split={self.split!r})"


class Mixture:
    """Tasks and/or mixtures with rates. A rate is a number, or a callable Task -> number applied to every leaf task."""

    def __init__(self, name: str, members: Sequence[tuple[str | Task | Mixture, Rate]], *, description: str = ""):
        _check_name(name, "mixture")
        members = list(members)
        if not members:
            raise DataError(f"mixture {name!r} has no members")
        for member in members:
            if not (isinstance(member, tuple) and len(member) == 2):
                raise DataError(f"mixture {name!r}: members are (name, rate) pairs, got {member!r}")
            target, rate = member
            if not isinstance(target, (str, Task, Mixture)):
                raise DataError(f"mixture {name!r}: member {target!r} is not a name, Task or Mixture")
            if not callable(rate) and not (isinstance(rate, (int, float)) and rate >= 0):
                raise DataError(f"mixture {name!r}: rate of {_member_name(target)!r} must be >= 0, got {rate!r}")
        self.name = name
        self.members = members
        self.description = description
        self._reported_zero: list[str] = []

    @classmethod
    def proportional(
        cls,
        name: str,
        names: Iterable[str | Task | Mixture],
        *,
        cap: int | None = None,
        temperature: float = 1.0,
        split: str = "train",
        description: str = "",
    ) -> Mixture:
        """FLAN's examples-proportional mixing: rate_i ∝ min(n_i, cap) ** (1 / temperature) over leaf tasks."""
        rate = _ExamplesProportional(cap, temperature, split)
        return cls(name, [(n, rate) for n in names], description=description)

    def _weighted_leaves(self, visiting: tuple[str, ...] = ()) -> list[tuple[Task, float]]:
        if self.name in visiting:
            raise DataError(f"mixture cycle: {' -> '.join(visiting + (self.name,))}")
        visiting = visiting + (self.name,)
        out: list[tuple[Task, float]] = []
        for target, rate in self.members:
            member = _resolve(target)
            if isinstance(member, Task):
                out.append((member, float(rate(member)) if callable(rate) else float(rate)))
            elif callable(rate):  # a rate rule applies to each leaf of the nested mixture
                out.extend((task, float(rate(task))) for task in member._leaves(visiting))
            else:
                sub = mixing.normalise(_sum_by_name(member._weighted_leaves(visiting)))
                by_name = {task.name: task for task in member._leaves(visiting)}
                out.extend((by_name[n], float(rate) * r) for n, r in sub.items())
        return out

    def _leaves(self, visiting: tuple[str, ...] = ()) -> list[Task]:
        if self.name in visiting:
            raise DataError(f"mixture cycle: {' -> '.join(visiting + (self.name,))}")
        visiting = visiting + (self.name,)
        seen: dict[str, Task] = {}
        for target, _ in self.members:
            member = _resolve(target)
            for task in [member] if isinstance(member, Task) else member._leaves(visiting):
                seen.setdefault(task.name, task)
        return list(seen.values())

    @property
    def tasks(self) -> list[Task]:
        """Leaf tasks (nested mixtures flattened), without loading any data."""
        return self._leaves()

    def rates(self) -> dict[str, float]:
        """Normalised rate per leaf task name (tasks with rate 0, e.g. empty ones, are left out and logged)."""
        raw = _sum_by_name(self._weighted_leaves())
        zero = sorted(name for name, rate in raw.items() if rate == 0)
        if zero and zero != self._reported_zero:  # said once, not at every call
            self._reported_zero = zero
            logging.warning("mixture %r: %d task(s) get rate 0 and are left out: %s", self.name, len(zero), ", ".join(zero))
        try:
            return mixing.normalise(raw)
        except DataError as error:
            raise DataError(f"mixture {self.name!r}: {error.bare_message}") from None

    def get_dataset(
        self,
        split: str = "train",
        *,
        seed: int = 0,
        shuffle: bool = True,
        template_set: str = "train",
        num_shots: int = 0,
    ) -> grain.MapDataset:
        """The INFINITE training stream: every task shuffled and repeated, interleaved by rate (deterministic)."""
        rates = self.rates()
        by_name = {task.name: task for task in self.tasks}
        datasets = {
            name: by_name[name].get_dataset(
                split, seed=seed, shuffle=shuffle, template_set=template_set, num_shots=num_shots, num_epochs=None
            )
            for name in rates
        }
        return mixing.mix(datasets, rates)

    def __repr__(self) -> str:
        return f"Mixture({self.name!r}, {[(_member_name(t), r) for t, r in self.members]!r})"


def _member_name(target: str | Task | Mixture) -> str:
    return target if isinstance(target, str) else target.name


def _sum_by_name(weighted: Iterable[tuple[Task, float]]) -> dict[str, float]:
    out: dict[str, float] = {}
    for task, rate in weighted:
        out[task.name] = out.get(task.name, 0.0) + rate
    return out


def _resolve(target: str | Task | Mixture) -> Task | Mixture:
    return get(target) if isinstance(target, str) else target


# ---------------------------------------------------------------------------- registry

_REGISTRY: dict[str, Task | Mixture] = {}
# The built-in task modules: the repository's tasks/, installed (and, in a source checkout,
# symlinked) as this package. The default of config.data.task_modules.
BUILTIN_TASK_MODULE = "flan_jax_tasks"


class UnknownNameError(DataError, LookupError):
    """No task or mixture is registered under this name."""


def _register(item: Task | Mixture, replace: bool) -> Task | Mixture:
    existing = _REGISTRY.get(item.name)
    if existing is not None and existing is not item and not replace:
        raise DataError(
            f"{type(item).__name__.lower()} name {item.name!r} is already registered "
            f"({type(existing).__name__}); pass replace=True to override it"
        )
    _REGISTRY[item.name] = item
    return item


def register_task(task: Task, *, replace: bool = False, check: bool | None = None) -> Task:
    """Registers a task under `task.name` (a duplicate name raises unless replace=True). Returns the task.

    The definition is always checked (metric names registered, options where a metric or the answer
    extractor needs them). `check` decides when a sample of the records is checked too (every
    template renders, references suit the metrics, answers are among the options; flan_jax.data.checks):
    True: now (reads the data); None (default): now when the source is in memory, otherwise when a run
    starts (train / evaluate), before any step or generation; False: not at registration.
    """
    if not isinstance(task, Task):
        raise TypeError(f"register_task needs a Task, got {type(task).__name__}")
    checks.check_definition(task)
    if check or (check is None and task.source.in_memory):
        checks.check_records(task)
    return _register(task, replace)


def register_mixture(mixture: Mixture, *, replace: bool = False) -> Mixture:
    """Registers a mixture under `mixture.name` (same namespace as tasks). Returns the mixture."""
    if not isinstance(mixture, Mixture):
        raise TypeError(f"register_mixture needs a Mixture, got {type(mixture).__name__}")
    return _register(mixture, replace)


def unregister(name: str) -> None:
    """Removes a name (tests use it to clean up)."""
    _REGISTRY.pop(name, None)


def get(name: str) -> Task | Mixture:
    """The task or mixture registered under `name`; unknown names raise with close matches."""
    try:
        return _REGISTRY[name]
    except KeyError:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=5, cutoff=0.6)
        hint = f"; did you mean {', '.join(close)}?" if close else f"; {len(_REGISTRY)} names are registered (data.list_names())"
        if BUILTIN_TASK_MODULE not in sys.modules:
            hint += (
                f". The built-in tasks are not imported: data.import_task_modules([{BUILTIN_TASK_MODULE!r}]) "
                "registers them (the trainer imports config.data.task_modules)"
            )
        raise UnknownNameError(f"no task or mixture named {name!r}{hint}") from None


def get_task(name: str) -> Task:
    item = get(name)
    if not isinstance(item, Task):
        raise DataError(f"{name!r} is a {type(item).__name__}, not a Task")
    return item


def get_mixture(name: str) -> Mixture:
    """The mixture `name`; a task name gives a one-task mixture, so trainers can take either."""
    item = get(name)
    return item if isinstance(item, Mixture) else Mixture(item.name, [(item, 1.0)])


def import_task_modules(modules: Sequence[str]) -> None:
    """Imports the modules that register tasks and mixtures (importing one twice is a no-op).

    Configs name them in `config.data.task_modules`, like seqio's `--module_import`: the built-in
    tasks (`BUILTIN_TASK_MODULE`, the repository's tasks/) by default, and a lab's own package, so a
    run can train on tasks this repository has never heard of. The registry itself imports nothing.
    """
    for module in modules:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            raise ModuleNotFoundError(
                f"config.data.task_modules names {module!r}, which cannot be imported ({error}); "
                "is its package installed or on PYTHONPATH?"
            ) from error


def list_names(kind: str | None = None) -> list[str]:
    """Sorted registered names; kind="task" or "mixture" to filter."""
    types = {None: (Task, Mixture), "task": (Task,), "mixture": (Mixture,)}[kind]
    return sorted(name for name, item in _REGISTRY.items() if isinstance(item, types))
