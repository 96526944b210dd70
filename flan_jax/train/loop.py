"""The training loop: mesh -> data -> state (fresh, resumed or from converted weights) -> jit step -> loop.

Read top to bottom; the pieces it wires live beside it (partitioning, optimizer, losses, step,
checkpointing, metrics). Hooks run at step boundaries in this order: log, evaluate, checkpoint,
preemption. A restart with the same workdir resumes from the newest readable checkpoint and
continues bit for bit (same batches, same RNG, same compiled step).
"""

from __future__ import annotations

import json
import logging
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from etils import epath
from flax import nnx

from flan_jax.train import (
    checkpointing,
    metrics as metrics_lib,
    objectives,
    optimizer,
    partitioning,
    state as state_lib,
    step as step_lib,
)


class NonFiniteError(RuntimeError):
    """The loss or gradients became NaN/inf and `config.train.on_nonfinite` is "stop"."""


def train(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> dict[str, Any]:
    """Trains (or resumes) the run in `workdir`; returns the last logged metrics."""
    check_config(config)
    maybe_initialize_distributed(config.distributed)
    workdir = epath.Path(workdir)
    is_main = jax.process_index() == 0
    if is_main:
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "config.json").write_text(json.dumps(checkpointing.config_to_dict(config), indent=2) + "\n")

    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.axis_rules(config.mesh)
    logging.info("Mesh %s over %d devices in %d processes", dict(mesh.shape), mesh.size, jax.process_count())

    objective = objectives.get_objective(config)
    model_cfg, parts = build_model(config, mesh, rules, heads=objective.model_heads)
    model_cfg.check_data(config.data)  # e.g. rows past a learned position table, decoder settings for T5
    tokenizer, data_iter = build_data(config, workdir)
    check_evaluation(config)
    if tokenizer.vocab_size > model_cfg.vocab_size:
        raise ValueError(
            f"The tokenizer has {tokenizer.vocab_size} ids but config.model.vocab_size={model_cfg.vocab_size}"
        )
    num_steps = int(config.train.num_steps)
    tx, schedule = optimizer.make_optimizer(config.optimizer, num_steps)
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)

    checkpoints = checkpointing.Checkpointer(workdir, config.checkpoint)
    state = checkpoints.restore_latest(state_lib.abstract_state(parts, tx, shardings, config.seed), data_iter)
    resumed = state is not None
    if state is None:
        state = state_lib.init_state(parts, tx, shardings, config.seed, mesh)
        if config.checkpoint.init_from:
            state = state.replace(params=load_init_params(config.checkpoint.init_from, parts, model_cfg))
    state, frozen_fingerprints = attach_frozen_slots(state, objective, parts, mesh, config, model_cfg, resumed=resumed)
    if resumed:
        check_frozen_fingerprints(checkpoints, int(state.step), frozen_fingerprints)
    start_step = int(state.step)
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules, objective)

    n_matmul = metrics_lib.matmul_param_count(parts.abstract_params, parts.logical_axes, tied_embeddings=model_cfg.tie_embeddings)
    if hasattr(model_cfg, "flops_per_token"):  # a family's own count (T5: encoder and decoder positions)
        flops_per_token = model_cfg.flops_per_token(n_matmul, config.data)
    else:
        flops_per_token = metrics_lib.flops_per_token(model_cfg, n_matmul, config.data.seq_len)
    reporter = metrics_lib.Reporter(workdir, config, flops_per_token, start_step=start_step, enabled=is_main)
    preemption = PreemptionWatcher()
    batch_sharding = partitioning.batch_sharding(mesh, rules)

    def evaluate(step: int) -> dict | None:
        return run_evaluation(config, parts.merge(state.params, state.frozen.get("base")), tokenizer, workdir, step)

    logged: dict[str, Any] = {}
    eval_results = None
    try:
        with jax.set_mesh(mesh):
            if start_step == 0 and config.eval.at_start:
                evaluate(0)
            for step in range(start_step + 1, num_steps + 1):
                batch = next(data_iter)
                if step == start_step + 1:
                    step_lib.check_batch(batch, config, mesh, objective)
                state, step_metrics = train_step(state, partitioning.global_batch(batch, batch_sharding))
                if step == start_step + 1:  # throughput excludes the compiling first step
                    reporter.restart_timer(step, step_metrics)

                last = step == num_steps
                if step % config.train.log_every == 0 or last:
                    values = jax.device_get(step_metrics)
                    stop_if_nonfinite(values, config, checkpoints)
                    logged = reporter.log(step, values, extra=data_counts(data_iter))

                eval_due = bool(config.eval.mixtures) and (
                    (config.eval.every_steps and step % config.eval.every_steps == 0) or (last and config.eval.at_end)
                )
                if eval_due:
                    eval_results = evaluate(step)
                ckpt_due = step % config.checkpoint.every_steps == 0 or last or (eval_due and config.checkpoint.keep_best_metric)
                if ckpt_due:
                    stop_if_nonfinite(jax.device_get(step_metrics), config, checkpoints)
                    checkpoints.save(
                        step, state, data_iter, config,
                        metrics=best_metric(eval_results, config, eval_due), frozen_fingerprints=frozen_fingerprints,
                    )
                if eval_due or ckpt_due:  # tokens/s measures training only
                    reporter.restart_timer(step, state.step)
                if preemption.requested(step, config.train.log_every):
                    logging.warning("SIGTERM received: saving a checkpoint at step %d and exiting", step)
                    stop_if_nonfinite(jax.device_get(step_metrics), config, checkpoints)
                    checkpoints.save(step, state, data_iter, config, frozen_fingerprints=frozen_fingerprints)
                    break
    finally:
        preemption.close()
        checkpoints.close()  # waits for pending async saves
        reporter.close()
    return logged


def check_config(config: ml_collections.ConfigDict) -> None:
    """Errors for trainer settings that would otherwise fail deep inside the loop."""
    positive = {
        "train.num_steps": config.train.num_steps,
        "train.log_every": config.train.log_every,
        "checkpoint.every_steps": config.checkpoint.every_steps,
        "checkpoint.keep": config.checkpoint.keep,
        "optimizer.grad_accum_steps": config.optimizer.grad_accum_steps,
    }
    bad = {name: value for name, value in positive.items() if int(value) < 1}
    if bad:
        raise ValueError(f"These config fields must be >= 1: {bad}")
    if config.eval.every_steps < 0:
        raise ValueError(f"config.eval.every_steps={config.eval.every_steps} must be >= 0 (0: only at start/end)")
    if config.checkpoint.get("best_mode", "max") not in ("max", "min"):
        raise ValueError(f"config.checkpoint.best_mode={config.checkpoint.best_mode!r}: expected 'max' or 'min'")


def build_data(config: ml_collections.ConfigDict, workdir: epath.Path):
    """(tokenizer, this process's checkpointable batch iterator), in the layout of the model family
    (its feature converter) and, when the run trains its tokenizer, the family's special-id convention."""
    from flan_jax import data
    from flan_jax.data import converters, loader, tokenizer as tokenizer_lib
    from flan_jax.model import registry

    data.import_task_modules(config.data.task_modules)
    family = registry.get_family(config.model.family)
    tokenizer = tokenizer_lib.load_tokenizer(
        config.data.tokenizer,
        workdir=workdir,
        train_mixture=config.data.train_mixture,
        train_split=config.data.train_split,
        convention=family.tokenizer_convention,
    )
    data_iter = loader.make_train_iterator(
        config.data,
        tokenizer,
        seed=config.seed,
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        converter=converters.get_converter(family.feature_converter),
    )
    return tokenizer, data_iter


def build_model(config: ml_collections.ConfigDict, mesh, rules, heads: tuple[str, ...] = ()):
    """(model config, ModelParts) of `config.model`, through the family registry."""
    from flan_jax.model import registry

    model_cfg = registry.config_from(config.model)
    parts = state_lib.ModelParts(
        lambda: registry.build_model(model_cfg, rngs=nnx.Rngs(config.seed), heads=heads), mesh, rules
    )
    return model_cfg, parts


def initial_params(config, parts: state_lib.ModelParts, mesh, model_cfg) -> dict:
    """The parameters step 0 starts from: `checkpoint.init_from`'s, or the seed's initialisation."""
    if config.checkpoint.init_from:
        return load_init_params(config.checkpoint.init_from, parts, model_cfg)
    return state_lib.init_params(parts, mesh)


def attach_frozen_slots(
    state: state_lib.TrainState, objective, parts, mesh, config, model_cfg, *, resumed: bool
) -> tuple[state_lib.TrainState, dict[str, str]]:
    """Fills the frozen slots the objective reads; returns the state and their fingerprints.

    "reference" is the initial policy: on a fresh run a copy of the step-0 parameters, on a resume
    rebuilt from the same source (init_from or seed) so it is never stored in the run's checkpoints.
    """
    frozen = {}
    for slot in objective.frozen_slots:
        if slot != "reference":
            raise ValueError(f"Objective {objective.name!r} asks for frozen slot {slot!r}; the trainer builds 'reference' only")
        frozen[slot] = initial_params(config, parts, mesh, model_cfg) if resumed else state_lib.copy_params(state.params)
    fingerprints = {slot: state_lib.fingerprint(params) for slot, params in frozen.items()}
    return state.replace(frozen=frozen), fingerprints


def check_frozen_fingerprints(checkpoints: checkpointing.Checkpointer, step: int, fingerprints: dict[str, str]) -> None:
    """A resumed run must read the same frozen parameters as the run that wrote its checkpoint."""
    saved = checkpoints.frozen_fingerprints(step)
    differing = sorted(slot for slot in set(saved) | set(fingerprints) if saved.get(slot) != fingerprints.get(slot))
    if differing:
        raise ValueError(
            f"Checkpoint step {step} in {checkpoints.directory} was trained against other frozen parameters "
            f"(slots {differing}: saved {[saved.get(s) for s in differing]}, now {[fingerprints.get(s) for s in differing]}). "
            "Did checkpoint.init_from or the seed change? Resume with the original ones or use another --workdir."
        )


def load_init_params(path: str, parts: state_lib.ModelParts, model_cfg) -> dict:
    """Converted weights (`flan_jax.convert.load_converted`) placed into this run's shardings.

    Params only: the optimizer state, step and data position start fresh.
    """
    from flan_jax import convert

    converted_cfg, params = convert.load_converted(path, dtype=model_cfg.param_dtype)
    differing = {
        k: (v, model_cfg.to_dict().get(k))
        for k, v in converted_cfg.to_dict().items()
        if k not in model_cfg.RUNTIME_FIELDS and model_cfg.to_dict().get(k) != v
    }
    if differing:
        raise ValueError(
            f"checkpoint.init_from={path}: its architecture differs from config.model "
            f"(field: (converted, config)): {differing}"
        )
    loaded = nnx.to_pure_dict(params)

    def place(path_, value, abstract, sharding):
        if tuple(np.shape(value)) != tuple(abstract.shape):
            raise ValueError(
                f"checkpoint.init_from={path}: {optimizer.param_path(path_)} has shape {np.shape(value)}, "
                f"config.model expects {abstract.shape}"
            )
        return jax.device_put(np.asarray(value, abstract.dtype), sharding)

    logging.info("Initialising parameters from %s", path)
    return jax.tree_util.tree_map_with_path(place, loaded, parts.abstract_params, parts.param_shardings)


def data_counts(data_iter) -> dict[str, int]:
    """This process's running totals of examples read and over-long ones truncated or dropped.

    Logged with the metrics so no truncation goes unseen (per-task counts: `data_iter.stats`).
    """
    stats = getattr(data_iter, "stats", None)
    if stats is None:
        return {}
    total = stats.total()
    return {
        "data_examples": total.examples,
        "data_truncated": total.truncated,
        "data_response_truncated": total.response_truncated,
        "data_dropped": total.dropped,
    }


def check_evaluation(config) -> None:
    """Checks the evaluation tasks (metrics, every example) when the run starts, so a bad one fails before step 1."""
    ev = config.eval
    if ev.mixtures and (ev.at_start or ev.at_end or ev.every_steps):
        from flan_jax.eval import evaluator

        evaluator.check(config)


def run_evaluation(config, model, tokenizer, workdir, step: int) -> dict | None:
    """Evaluates `config.eval.mixtures` and writes DIR/eval/step_<N>.json (no-op without mixtures)."""
    if not config.eval.mixtures:
        return None
    from flan_jax.eval import evaluator

    started = time.perf_counter()
    results = evaluator.evaluate(model, tokenizer, config, workdir=os.fspath(workdir), step=step)
    logging.info("Evaluation at step %d took %.1fs: %s", step, time.perf_counter() - started, results.get("summary"))
    return results


def best_metric(eval_results: dict | None, config, eval_ran_now: bool) -> dict | None:
    """The metric Orbax ranks checkpoints by, when this step was just evaluated."""
    name = config.checkpoint.keep_best_metric
    if not (name and eval_ran_now and eval_results):
        return None
    summary = eval_results.get("summary", {})
    if name not in summary:
        raise KeyError(f"config.checkpoint.keep_best_metric={name!r} is not an eval summary key: {sorted(summary)}")
    return {name: float(summary[name])}


def stop_if_nonfinite(values: dict, config, checkpoints: checkpointing.Checkpointer) -> None:
    """In "stop" mode, ends the run at the first non-finite step (no checkpoint is written after it)."""
    bad_step = int(values["first_nonfinite_step"])
    if config.train.on_nonfinite != "stop" or bad_step < 0:
        return
    checkpoints.wait()
    raise NonFiniteError(
        f"Non-finite loss or gradients at step {bad_step}; stopping (config.train.on_nonfinite='stop'). "
        f"The last good checkpoint is step {checkpoints.latest_step()} in {checkpoints.directory}; "
        "set on_nonfinite='skip' to skip such updates instead."
    )


class PreemptionWatcher:
    """Turns SIGTERM into a request to checkpoint and exit cleanly at the next step boundary.

    With several processes the flag is agreed on at log steps (an all-gather), so every process
    saves at the same step.
    """

    def __init__(self):
        self._flag = False
        self._previous = None
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a notebook worker)
            logging.warning("SIGTERM handler not installed (not on the main thread)")

    def close(self) -> None:
        """Restores the previous handler (train() may run inside a longer-lived process)."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def _handle(self, signum, frame) -> None:
        del signum, frame
        self._flag = True

    def requested(self, step: int, every: int) -> bool:
        if jax.process_count() == 1:
            return self._flag
        if step % every:
            return False
        from jax.experimental import multihost_utils

        return bool(np.any(multihost_utils.process_allgather(np.array(self._flag))))


def maybe_initialize_distributed(dist_config: Any) -> None:
    """`jax.distributed.initialize` from config.distributed, or from JAX_COORDINATOR_ADDRESS & co.

    Must run before anything touches a jax backend. On CPU the cross-process collectives go
    through gloo.
    """
    from_env = bool(os.environ.get("JAX_COORDINATOR_ADDRESS"))
    if not (dist_config.initialize or from_env) or jax.distributed.is_initialized():
        return
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    kwargs: dict[str, Any] = {}
    address = dist_config.coordinator_address or os.environ.get("JAX_COORDINATOR_ADDRESS", "")
    num_processes = dist_config.num_processes or int(os.environ.get("JAX_NUM_PROCESSES", "0"))
    process_id = dist_config.process_id if dist_config.process_id >= 0 else int(os.environ.get("JAX_PROCESS_ID", "-1"))
    if address:
        kwargs["coordinator_address"] = address
    if num_processes:
        kwargs["num_processes"] = num_processes
    if process_id >= 0:
        kwargs["process_id"] = process_id
    jax.distributed.initialize(**kwargs)
    logging.info("jax.distributed initialised: process %d of %d", jax.process_index(), jax.process_count())
