"""The loop every kind of run shares around its own step: SFT, reward models and DPO
(flan_jax/train/loop.py) take one batch per step, GRPO / PPO (flan_jax/rl/loop.py) a rollout and
several updates; the hooks around the step are the same and run in the same order.

Per step: the run's `take_step`, then a failed asynchronous save is reported (one step after it),
then, at step boundaries, log (`train.log_every` and the last step), evaluate, checkpoint,
preemption (SIGTERM: save and stop). Before the first step: a SIGTERM that came during start-up
stops the run, and a fresh run evaluates at step 0 when asked. Kept in one place so that a change
to the hooks (their order is what makes a resumed run continue bit for bit) reaches every run.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import jax


@dataclasses.dataclass
class StepOutcome:
    """What a run's step hands to the shared hooks.

    `metrics`: the step's metrics tree (device arrays or host values), fetched only when the step is
    logged; `extra`: more fields for that log record (called only then).
    """

    state: Any
    metrics: Mapping[str, Any]
    extra: Callable[[], dict[str, Any]] = dict


def run_steps(
    take_step: Callable[[int, Any], StepOutcome],
    state,
    *,
    start_step: int,
    config,
    mesh,
    data_iter,
    checkpoints,
    reporter,
    guard,
    preemption,
    evaluate: Callable[[int, Any], dict | None],
    fingerprints: dict[str, str],
    config_changes: dict[str, list],
) -> dict[str, Any]:
    """Runs steps `start_step + 1 .. config.train.num_steps`; returns the last logged metrics.

    `take_step(step, state)` runs one step (recording its losses in `guard`); `evaluate(step, state)`
    evaluates the state. `data_iter` is what the checkpoints save beside the state. Closes
    `checkpoints` (waiting for pending saves) and `reporter` however the loop ends.
    """
    num_steps = int(config.train.num_steps)
    logged: dict[str, Any] = {}
    eval_results = None
    try:
        with jax.set_mesh(mesh):
            if preemption.requested_before_start(start_step):
                return logged
            if start_step == 0 and config.eval.at_start:
                evaluate(0, state)
            for step in range(start_step + 1, num_steps + 1):
                outcome = take_step(step, state)
                state = outcome.state
                checkpoints.poll()  # a failed asynchronous save is reported here, one step after it
                if step == start_step + 1:  # throughput excludes the compiling first step
                    reporter.restart_timer(step, state.step)

                last = step == num_steps
                if step % config.train.log_every == 0 or last:
                    guard.check(checkpoints)
                    extra = outcome.extra()
                    if config_changes and not logged:  # the first record after a resume that changed the config
                        extra["config_changes"] = config_changes
                    logged = reporter.log(step, jax.device_get(outcome.metrics), extra=extra)

                eval_results, stop = end_of_step(
                    step, last, state, data_iter, config, checkpoints=checkpoints, guard=guard, reporter=reporter,
                    preemption=preemption, evaluate=evaluate, eval_results=eval_results, fingerprints=fingerprints,
                )
                if stop:
                    break
    finally:
        try:
            checkpoints.close()  # waits for pending async saves (and writes their checksums)
        finally:
            reporter.close()
    return logged


def end_of_step(
    step: int, last: bool, state, data_iter, config, *, checkpoints, guard, reporter, preemption, evaluate,
    eval_results: dict | None, fingerprints: dict[str, str],
) -> tuple[dict | None, bool]:
    """The hooks after a step's log, in order: evaluate, checkpoint, preemption (SIGTERM: save and
    stop). Returns (the newest evaluation results, whether the run stops now)."""
    eval_due = bool(config.eval.mixtures) and (
        (config.eval.every_steps and step % config.eval.every_steps == 0) or (last and config.eval.at_end)
    )
    if eval_due:
        eval_results = evaluate(step, state)
    ckpt_due = step % config.checkpoint.every_steps == 0 or last or (eval_due and config.checkpoint.keep_best_metric)
    if ckpt_due:
        guard.check(checkpoints)
        checkpoints.save(
            step, state, data_iter, config,
            metrics=best_metric(eval_results, config, eval_due), frozen_fingerprints=fingerprints,
        )
    if eval_due or ckpt_due:  # tokens/s measures training only
        reporter.restart_timer(step, state.step)
    if preemption.requested(step, config.train.log_every):
        logging.warning("SIGTERM received: saving a checkpoint at step %d and exiting", step)
        guard.check(checkpoints)
        checkpoints.save(step, state, data_iter, config, frozen_fingerprints=fingerprints)
        return eval_results, True
    return eval_results, False


def best_metric(eval_results: dict | None, config, eval_ran_now: bool) -> dict | None:
    """The metric Orbax ranks checkpoints by, when this step was just evaluated."""
    name = config.checkpoint.keep_best_metric
    if not (name and eval_ran_now and eval_results):
        return None
    summary = eval_results.get("summary", {})
    if name not in summary:
        raise KeyError(f"config.checkpoint.keep_best_metric={name!r} is not an eval summary key: {sorted(summary)}")
    return {name: float(summary[name])}
