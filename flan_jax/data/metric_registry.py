"""Metrics by name: what `Task(metrics=(...))` may list, how each scores one example, how scores add up.

A metric is a per-example function `(prediction, references[, example]) -> score` plus how the
scores of a task's examples are aggregated (default: the mean x 100, a percentage, as SNI and FLAN
report). Per example, because a score is also what other stages consume one example at a time
(an RL reward is a task's metric on one generation). The built-in metrics (flan_jax.eval.metrics:
exact_match, rouge_l, gsm8k_accuracy, rank_classification, loss) are registered by the same
`register_metric` call a user makes:

    from flan_jax import data

    @data.register_metric("contains_answer")
    def contains_answer(prediction: str, references: list[str]) -> float:
        return float(any(ref.lower() in prediction.lower() for ref in references))

    data.register_task(data.Task("my_qa", source, templates, metrics=("contains_answer",)))

What a metric scores is its `prediction` kind:
  "generation"     the answer read from the greedy generation (the task's `answer=` extractor applied)
  "ranked_option"  the option rank classification picked (the model's log-likelihood of each option)
  "likelihood"     nothing per example: computed from the targets' log-likelihoods (the built-in `loss`)

A metric may also say, per reference, why it could never score it (`check_reference`: GSM8K
accuracy needs a number); tasks are checked with it when they are registered or a run starts, so
a bad reference fails before anything is generated.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flan_jax.data.answers import accepts_positional, options_problem
from flan_jax.data.errors import DataError

PREDICTION_KINDS = ("generation", "ranked_option", "likelihood")
ScoreFn = Callable[..., float]


def percent_mean(scores: Sequence[float]) -> float:
    """The default aggregate: mean score x 100 (metrics score 0..1 per example, tasks report percentages)."""
    if not scores:
        raise ValueError("cannot aggregate zero scores")
    return 100.0 * math.fsum(scores) / len(scores)


@dataclasses.dataclass(frozen=True)
class Metric:
    """A registered metric; `score` is one example's score, `aggregate` turns a task's scores into its number."""

    name: str
    fn: ScoreFn | None
    prediction: str = "generation"
    aggregate: Callable[[Sequence[float]], float] = percent_mean
    check_reference: Callable[[str], str | None] | None = None
    needs_options: bool = False
    higher_is_better: bool = True
    description: str = ""

    def __post_init__(self):
        # Decided once: user functions may or may not take the example as a third argument.
        object.__setattr__(self, "_with_example", self.fn is not None and accepts_positional(self.fn, 3))

    def score(self, prediction: str, references: Sequence[str], example: Mapping[str, Any] | None = None) -> float:
        """One example's score (the references a list of str; `example` the rendered example)."""
        if self.fn is None:
            raise TypeError(f"metric {self.name!r} is computed from log-likelihoods, not from a prediction")
        if isinstance(references, str) or not references:
            raise ValueError(f"references must be a non-empty list of strings, got {references!r}")
        if self._with_example:
            return self.fn(prediction, references, example or {})
        return self.fn(prediction, references)

    def problem(self, example: Mapping[str, Any]) -> str | None:
        """Why this metric could never score `example` right (None: it can), checked before any generation."""
        if self.needs_options:
            problem = options_problem(example)
            if problem:
                return problem
        if self.check_reference is not None:
            for reference in example.get("references") or []:
                problem = self.check_reference(reference)
                if problem:
                    return f"reference {reference!r}: {problem}"
        return None


_METRICS: dict[str, Metric] = {}
_builtins_loaded = False


def register_metric(
    name: str,
    fn: ScoreFn | None = None,
    *,
    prediction: str = "generation",
    aggregate: Callable[[Sequence[float]], float] | None = None,
    check_reference: Callable[[str], str | None] | None = None,
    needs_options: bool = False,
    higher_is_better: bool = True,
    description: str = "",
    replace: bool = False,
):
    """Registers metric `name`; returns the `Metric`, or, without `fn`, a decorator that registers `fn`.

    fn: `(prediction, references) -> float` or `(prediction, references, example) -> float`, per
      example (usually 0..1); references is a list of acceptable answers.
    prediction: what `fn` scores, "generation" (default) or "ranked_option" (see the module docstring).
    aggregate: a task's scores -> its reported number (default: mean x 100).
    check_reference: reference -> None, or a message why `fn` could never score it.
    needs_options: the task must have answer options, and one must match a reference.
    A name already taken raises unless `replace=True`.
    """
    if not isinstance(name, str) or not name.isidentifier():
        raise DataError(f"invalid metric name {name!r}: use letters, digits and _ (it becomes a results key)")
    if prediction not in PREDICTION_KINDS:
        raise DataError(f"metric {name!r}: prediction={prediction!r}; expected one of {PREDICTION_KINDS}")
    if fn is None and prediction != "likelihood":

        def decorator(function: ScoreFn) -> ScoreFn:
            register_metric(
                name, function, prediction=prediction, aggregate=aggregate, check_reference=check_reference,
                needs_options=needs_options, higher_is_better=higher_is_better, description=description,
                replace=replace,
            )
            return function

        return decorator
    if fn is not None and not callable(fn):
        raise TypeError(f"metric {name!r}: fn must be callable, got {type(fn).__name__}")
    if name in _METRICS and not replace:
        raise DataError(f"metric name {name!r} is already registered; pass replace=True to override it")
    metric = Metric(
        name, fn, prediction, aggregate or percent_mean, check_reference, needs_options or prediction == "ranked_option",
        higher_is_better, description or (getattr(fn, "__doc__", "") or "").strip().split("\n")[0],
    )
    _METRICS[name] = metric
    return metric


def _load_builtins() -> None:
    """Imports flan_jax.eval.metrics once: it registers the built-in metrics (like `tasks` registers tasks)."""
    global _builtins_loaded
    if not _builtins_loaded:
        _builtins_loaded = True  # set first: the module calls register_metric while it is imported
        try:
            importlib.import_module("flan_jax.eval.metrics")
        except BaseException:
            _builtins_loaded = False
            raise


def get_metric(name: str) -> Metric:
    """The metric registered under `name`; an unknown name raises listing the registered ones."""
    _load_builtins()
    try:
        return _METRICS[name]
    except KeyError:
        raise DataError(unknown_message([name])) from None


def metric_names() -> list[str]:
    """Sorted names of the registered metrics (built-ins included)."""
    _load_builtins()
    return sorted(_METRICS)


def unregister_metric(name: str) -> None:
    """Removes a metric (tests use it to clean up)."""
    _METRICS.pop(name, None)


def unknown_message(names: Sequence[str]) -> str:
    _load_builtins()
    unknown = [n for n in names if n not in _METRICS]
    hints = []
    for n in unknown:
        close = difflib.get_close_matches(str(n), list(_METRICS), n=3, cutoff=0.6)
        if close:
            hints.append(f"{n!r}: did you mean {', '.join(close)}?")
    return (
        f"unknown metric(s) {unknown}; registered: {', '.join(sorted(_METRICS))}"
        + (f" ({'; '.join(hints)})" if hints else "")
        + ". Register one with data.register_metric(name, fn) before the task"
    )


def check_metric_names(names: Sequence[str], *, task: str) -> None:
    """Fails naming the task when it lists a metric nobody registered."""
    _load_builtins()
    if any(name not in _METRICS for name in names):
        raise DataError(unknown_message(names), task=task)
