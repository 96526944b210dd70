"""Rewards by name: what `config.rl.rewards` may list, and how a rollout's completions are scored.

A reward is a function of one completion and the rendered example of its prompt (task, template,
references, options), registered under a name, as a metric is:

    from flan_jax import rl

    @rl.register_reward("short_answer")
    def short_answer(completion: str, example: dict) -> float:
        return 1.0 if len(completion.split()) <= 5 else 0.0

and selected with `config.rl.rewards = ("task_metric", "short_answer")` (weights in
`config.rl.reward_weights`; the module that registers it goes in `config.data.task_modules`).

Built in:
  "task_metric"   the prompt's own task scores the completion with its metric, through the task's
                  answer extractor: exact match, the GSM8K final number, the chosen option (rank
                  classification's metric applied to the generated answer), ROUGE-L, or any metric
                  a user registered. So every task with a metric is an RL task with no extra code.
                  `config.rl.task_metric` picks the metric; default: the task's first one that
                  scores a prediction. A task without one is refused when the run starts.
  "reward_model"  the `score` head of a reward model (the preference stage's `reward_model` run, or a
                  Hugging Face *ForSequenceClassification folder) on `[BOS] prompt completion`, read
                  at the completion's last token like its training did (flan_jax/rl/reward_model.py).

Format penalties (`config.rl.no_eos_penalty`, `overlong_penalty` over the last `overlong_buffer`
tokens) are subtracted from the weighted sum.

A reward that raises or returns NaN/inf for a completion is an error naming the reward, the task,
the template, the prompt and the completion (`config.rl.on_bad_reward="error"`), or, with "skip",
that completion leaves the loss and group statistics (counted, logged, its reward NaN).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from flan_jax.rl.prompts import describe

BAD_REWARD_POLICIES = ("error", "skip")


@dataclasses.dataclass(frozen=True)
class Completion:
    """One sampled completion: decoded text (EOS excluded), its prompt's example, tokens, whether it ended."""

    text: str
    example: dict
    prompt_tokens: Sequence[int]
    tokens: Sequence[int]
    ended: bool  # EOS within max_new_tokens


BatchReward = Callable[[Sequence[Completion]], Sequence[float]]
# (config, runtime) -> a batch reward; `runtime` has mesh, rules, tokenizer (see loop.py).
RewardFactory = Callable[[Any, Any], BatchReward]


class RewardError(ValueError):
    """A reward raised or was not finite for a completion and `config.rl.on_bad_reward` is "error"."""


class _PerCompletion:
    """A user's `(completion, example) -> float`, called once per completion, errors located."""

    def __init__(self, name: str, fn: Callable[[str, dict], float]):
        self.name, self.fn = name, fn

    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        out = []
        for c in completions:
            try:
                out.append(float(self.fn(c.text, c.example)))
            except Exception as error:  # noqa: BLE001 (located and judged by RewardSet)
                out.append(_Failure(error))
        return out


class _Failure(float):
    """NaN that remembers why (a reward raised for this completion)."""

    def __new__(cls, error: Exception):
        value = super().__new__(cls, math.nan)
        value.error = error
        return value


_REWARDS: dict[str, RewardFactory] = {}


def register_reward(name: str, fn: Callable[[str, dict], float] | None = None, *, replace: bool = False):
    """Registers the per-completion reward `fn(completion_text, example) -> float` (or decorates one)."""
    if fn is None:
        def decorator(function):
            register_reward(name, function, replace=replace)
            return function
        return decorator
    if not callable(fn):
        raise TypeError(f"reward {name!r}: fn must be callable, got {type(fn).__name__}")
    register_reward_factory(name, lambda config, runtime: _PerCompletion(name, fn), replace=replace)
    return fn


def register_reward_factory(name: str, factory: RewardFactory, *, replace: bool = False) -> None:
    """Registers a reward built from the run (`factory(config, runtime) -> batch reward`), e.g. a model."""
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"invalid reward name {name!r}: use letters, digits and _ (it becomes a metrics key)")
    if name in _REWARDS and not replace:
        raise ValueError(f"reward name {name!r} is already registered; pass replace=True to override it")
    _REWARDS[name] = factory


def reward_names() -> list[str]:
    _register_builtin()
    return sorted(_REWARDS)


# ----------------------------------------------------------------------------- task_metric
class TaskMetricReward:
    """The prompt's task scores the completion with its own metric (see the module docstring)."""

    def __init__(self, metric: str = ""):
        self.metric = metric

    def metric_for(self, task) -> Any:
        """The registered metric this reward uses for `task`; a task that has none is refused by name."""
        from flan_jax.data.metric_registry import get_metric

        if self.metric:
            metric = get_metric(self.metric)
            if metric.fn is None:
                raise ValueError(f"config.rl.task_metric={self.metric!r} is computed from log-likelihoods, not a completion")
            return metric
        scoring = [get_metric(n) for n in task.metrics]
        scoring = [m for m in scoring if m.fn is not None and m.prediction in ("generation", "ranked_option")]
        if not scoring:
            raise ValueError(
                f"task {task.name!r} has no metric that scores a prediction (metrics={tuple(task.metrics)}), so reward "
                "'task_metric' cannot score its completions: give the task a metric (data.register_metric), set "
                "config.rl.task_metric, or use another reward (config.rl.rewards)"
            )
        return scoring[0]

    def check_tasks(self, tasks: Sequence[Any]) -> None:
        for task in tasks:
            self.metric_for(task)

    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        from flan_jax import data

        out = []
        for c in completions:
            try:
                task = data.get_task(c.example["task"])
                metric = self.metric_for(task)
                answer = task.extract_answer(c.text, c.example)
                out.append(float(metric.score(answer, c.example["references"], c.example)))
            except Exception as error:  # noqa: BLE001 (located and judged by RewardSet)
                out.append(_Failure(error))
        return out


def _task_metric_factory(config, runtime) -> TaskMetricReward:
    return TaskMetricReward(str(config.rl.task_metric))


def _reward_model_factory(config, runtime):
    from flan_jax.rl import reward_model

    return reward_model.RewardModelReward.from_config(config, runtime)


def _register_builtin() -> None:
    if "task_metric" not in _REWARDS:
        register_reward_factory("task_metric", _task_metric_factory)
    if "reward_model" not in _REWARDS:
        register_reward_factory("reward_model", _reward_model_factory)


# ----------------------------------------------------------------------------- the run's rewards
@dataclasses.dataclass
class Scored:
    """Rewards of a rollout: total (NaN where skipped), per reward, bad mask, penalties."""

    total: np.ndarray
    per_reward: dict[str, np.ndarray]
    bad: np.ndarray
    penalty: np.ndarray


class RewardSet:
    """The configured rewards with their weights, the format penalties and the bad-reward policy."""

    def __init__(self, config: Any, runtime: Any):
        _register_builtin()
        rl = config.rl
        names = tuple(rl.rewards)
        if not names:
            raise ValueError("config.rl.rewards is empty: name at least one registered reward")
        unknown = [n for n in names if n not in _REWARDS]
        if unknown:
            raise ValueError(
                f"config.rl.rewards names unregistered reward(s) {unknown}; registered: {sorted(_REWARDS)} "
                "(a module registering yours goes in config.data.task_modules)"
            )
        weights = tuple(float(w) for w in rl.reward_weights) or (1.0,) * len(names)
        if len(weights) != len(names):
            raise ValueError(f"config.rl.reward_weights has {len(weights)} values for {len(names)} rewards {names}")
        if str(rl.on_bad_reward) not in BAD_REWARD_POLICIES:
            raise ValueError(f"config.rl.on_bad_reward={rl.on_bad_reward!r}: expected one of {BAD_REWARD_POLICIES}")
        self.names, self.weights = names, weights
        self.on_bad = str(rl.on_bad_reward)
        self.max_new_tokens = int(rl.max_new_tokens)
        self.no_eos_penalty = float(rl.no_eos_penalty)
        self.overlong_buffer, self.overlong_penalty = int(rl.overlong_buffer), float(rl.overlong_penalty)
        if not 0 <= self.overlong_buffer <= self.max_new_tokens:
            raise ValueError(f"config.rl.overlong_buffer={self.overlong_buffer} must be in 0..rl.max_new_tokens")
        self.rewards = {name: _REWARDS[name](config, runtime) for name in names}
        self.bad_count = 0  # completions skipped so far (restored from the checkpointed counts)
        self._logged = 0

    def check_tasks(self, tasks: Sequence[Any]) -> None:
        """Refuses, before any rollout, tasks a reward cannot score (e.g. task_metric on a task without metric)."""
        for reward in self.rewards.values():
            check = getattr(reward, "check_tasks", None)
            if check is not None:
                check(tasks)

    def penalties(self, completions: Sequence[Completion]) -> np.ndarray:
        out = np.zeros(len(completions), np.float64)
        for i, c in enumerate(completions):
            if not c.ended:
                out[i] += self.no_eos_penalty
            if self.overlong_buffer and self.overlong_penalty:
                start = self.max_new_tokens - self.overlong_buffer
                out[i] += self.overlong_penalty * max(len(c.tokens) - start, 0) / self.overlong_buffer
        return out

    def __call__(self, completions: Sequence[Completion]) -> Scored:
        n = len(completions)
        per_reward, bad = {}, np.zeros(n, bool)
        for name, reward in self.rewards.items():
            try:
                values = list(reward(completions))
            except Exception as error:
                raise RewardError(f"reward {name!r} failed on a batch of {n} completions: {error!r}") from error
            if len(values) != n:
                raise RewardError(f"reward {name!r} returned {len(values)} values for {n} completions")
            array = np.asarray([float(v) for v in values], np.float64)
            for i in np.flatnonzero(~np.isfinite(array)):
                self._bad(name, completions[int(i)], values[int(i)])
                bad[i] = True
            per_reward[name] = array
        penalty = self.penalties(completions)
        total = sum(w * np.nan_to_num(per_reward[name]) for name, w in zip(self.names, self.weights)) - penalty
        total = np.where(bad, np.nan, total)
        self.bad_count += int(bad.sum())
        return Scored(total=total, per_reward=per_reward, bad=bad, penalty=penalty)

    def _bad(self, name: str, completion: Completion, value: Any) -> None:
        error = getattr(value, "error", None)
        why = f"raised {error!r}" if error is not None else f"returned {float(value)}"
        message = f"reward {name!r} {why} for the completion {completion.text[:200]!r} of {describe(completion.example)}"
        if self.on_bad == "error":
            raise RewardError(message + "; set config.rl.on_bad_reward='skip' to leave such completions out (counted)") from error
        if self._logged < 10:
            self._logged += 1
            logging.warning("%s: left out of the loss (config.rl.on_bad_reward='skip')", message)
