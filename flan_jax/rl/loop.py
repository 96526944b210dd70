"""The online RL loop (`config.objective.name = "grpo" | "ppo"`): rollout, update, repeat, in one run.

    python -m flan_jax.train --config=configs/grpo_demo.py:workdirs/demo --workdir=workdirs/demo_grpo

Each of `train.num_steps` steps draws `data.batch_size / rl.group_size` prompts of the training
mixture (flan_jax/rl/prompts.py), samples `rl.group_size` completions of each with the current
policy, scores and turns them into an update batch (flan_jax/rl/rollout.py), then takes
`rl.epochs x rl.minibatches` optimizer steps on it with the trainer's own jitted step and the
objective (flan_jax/rl/grpo.py, ppo.py). Everything else is the SFT trainer's (flan_jax/train/loop.py):
mesh and axis rules, the model through the family registry, `checkpoint.init_from` (an SFT workdir,
converted weights), the frozen "reference" slot rebuilt from it and fingerprinted, the optimizer,
checkpoints, metrics.jsonl / TensorBoard, evaluation, SIGTERM handling, the non-finite guard.

A checkpoint (named by RL step) holds the policy (and value head), the optimizer state, the step
counter and RNG, and the prompt stream's position with its counts (plus a PPO-ptx loader's state);
the reference and a reward model are rebuilt from their sources and checked by fingerprint. So a
run killed at any moment and restarted continues bit for bit: same prompts, same samples (the
rollout key is a function of the run's key and the step), same updates (tests/test_rl_resume.py).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import grain
import jax
import ml_collections
import numpy as np
from etils import epath

from flan_jax.rl import prompts as prompts_lib
from flan_jax.rl import rollout as rollout_lib
from flan_jax.rl.rewards import RewardSet
from flan_jax.train import (
    checkpointing,
    loop as train_loop,
    metrics as metrics_lib,
    objectives,
    optimizer,
    partitioning,
    state as state_lib,
    step as step_lib,
    step_loop,
)
from flan_jax.train.nonfinite import NonfiniteGuard

# Wall-clock measurements: logged, but not part of what a resumed run reproduces.
TIMING_KEYS = ("rollout_seconds", "generation_seconds", "update_seconds", "generation_share", "rollout_tokens_per_sec")


class RunState(grain.DatasetIterator):
    """The RL run's resumable inputs, saved as the checkpoint's data iterator: the prompt stream, a
    PPO-ptx SFT loader, and running counters (completions whose reward was skipped)."""

    def __init__(self, prompts: prompts_lib.PromptIterator, ptx: Any = None):
        super().__init__()
        self.prompts, self.ptx = prompts, ptx
        self.counters = {"bad_rewards": 0}

    def __next__(self):
        return next(self.prompts)

    def get_state(self) -> dict[str, Any]:
        state = {"prompts": self.prompts.get_state(), "counters": dict(self.counters)}
        if self.ptx is not None:
            state["ptx"] = self.ptx.get_state()
        return state

    def set_state(self, state: Mapping[str, Any]) -> None:
        if ("ptx" in state) != (self.ptx is not None):
            raise ValueError("the checkpoint's RL state and this run disagree on PPO-ptx (config.rl.ptx_coef)")
        self.prompts.set_state(state["prompts"])
        self.counters = {k: int(v) for k, v in state["counters"].items()}
        if self.ptx is not None:
            self.ptx.set_state(state["ptx"])

    def __str__(self) -> str:
        return f"RunState({self.prompts})"


class Runtime:
    """What rewards built from the run may use (a reward model needs the mesh)."""

    def __init__(self, mesh, rules, tokenizer):
        self.mesh, self.rules, self.tokenizer = mesh, rules, tokenizer


def check_rl_config(config: ml_collections.ConfigDict, mesh=None) -> None:
    """Errors for RL settings that would otherwise fail deep inside a rollout."""
    rl = config.rl
    rows, group = int(config.data.batch_size), int(rl.group_size)
    if group < 1 or rows % group:
        raise ValueError(
            f"config.rl.group_size={group} must divide config.data.batch_size={rows} (completions per step = "
            "prompts per step x group size)"
        )
    if group == 1 and config.objective.name == "grpo":
        raise ValueError("config.rl.group_size=1: GRPO's advantages compare completions of one prompt; use >= 2")
    epochs, minibatches = int(rl.epochs), int(rl.minibatches)
    if epochs < 1 or minibatches < 1 or rows % minibatches:
        raise ValueError(f"config.rl.epochs={epochs} and rl.minibatches={minibatches} must be >= 1, minibatches dividing data.batch_size={rows}")
    if mesh is not None:
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        accum = int(config.optimizer.grad_accum_steps)
        if (rows // minibatches) % (data_parallel * accum):
            raise ValueError(
                f"an update's {rows // minibatches} rows (data.batch_size / rl.minibatches) must be divisible by "
                f"optimizer.grad_accum_steps ({accum}) x the data-parallel devices ({data_parallel})"
            )
    max_new = int(rl.max_new_tokens)
    if not 1 <= max_new < int(config.data.seq_len) - 1:
        raise ValueError(f"config.rl.max_new_tokens={max_new} must be >= 1 and leave room for a prompt in data.seq_len={config.data.seq_len}")
    if config.data.prefix_lm:
        raise ValueError("config.data.prefix_lm=True: RL rollouts and updates are causal; train the policy without prefix-LM")
    if jax.process_count() > 1:
        raise NotImplementedError("RL runs (grpo / ppo) are single-process for now (any number of local devices)")


def train(config: ml_collections.ConfigDict, workdir: epath.Path, preemption) -> dict[str, Any]:
    """Runs (or resumes) the RL run in `workdir`; returns the last logged metrics.

    Called by `flan_jax.train.loop.train` (which installed the SIGTERM watcher, checked the trainer
    settings and locked the workdir) when the objective's `loop` is "rl".
    """
    check_rl_config(config)
    is_main = jax.process_index() == 0
    workdir = epath.Path(workdir)
    mesh = partitioning.make_mesh(config.mesh)
    rules = partitioning.axis_rules(config.mesh)
    check_rl_config(config, mesh)
    objective = objectives.get_objective(config)
    tokenizer = train_loop.build_tokenizer(config, workdir)
    train_loop.check_evaluation(config)
    model_cfg, parts = train_loop.build_model(config, mesh, rules, heads=objective.model_heads)
    train_loop.check_model_fits(config, model_cfg, tokenizer)

    rl = config.rl
    group = int(rl.group_size)
    prompt_budget = int(config.data.seq_len) - int(rl.max_new_tokens)
    prompt_iter = prompts_lib.make_prompt_iterator(
        config, tokenizer, prompts_per_step=int(config.data.batch_size) // group, max_prompt_tokens=prompt_budget
    )
    run_state = RunState(prompt_iter, build_ptx_iterator(config, tokenizer) if float(rl.ptx_coef) else None)
    rewards = RewardSet(config, Runtime(mesh, rules, tokenizer))
    rewards.check_tasks(train_tasks(config))

    updates = int(rl.epochs) * int(rl.minibatches)
    num_steps = int(config.train.num_steps)
    tx, schedule = optimizer.make_optimizer(config.optimizer, num_steps * updates)
    shardings = state_lib.state_shardings(parts, tx, mesh, objective.frozen_slots)
    checkpoints = checkpointing.Checkpointer(workdir, config.checkpoint)
    reward_fingerprints = {
        f"reward:{name}": reward.fingerprint for name, reward in rewards.rewards.items() if getattr(reward, "fingerprint", None)
    }
    state, fingerprints, config_changes = train_loop.start_state(
        config, workdir, checkpoints, run_state, parts, tx, shardings, mesh, model_cfg, objective,
        extra_fingerprints=reward_fingerprints, updates_per_step=updates,
    )
    rewards.bad_count = run_state.counters["bad_rewards"]
    start_step = int(state.step) // updates
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules, objective)
    roller = rollout_lib.Roller(config, objective, parts, tokenizer, rewards, mesh, rules)

    flops_per_token = train_loop.training_flops_per_token(parts, model_cfg, config.data)
    reporter = metrics_lib.Reporter(workdir, config, flops_per_token, start_step=start_step, enabled=is_main)
    guard = NonfiniteGuard(config.train, skipped_before=int(state.nonfinite_steps))
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    run_key = jax.random.fold_in(jax.random.wrap_key_data(state.rng), rollout_lib.ROLLOUT_SALT)

    def evaluate(step: int, state) -> dict | None:
        return train_loop.run_evaluation(config, parts.merge(state.params, state.frozen.get("base")), tokenizer, workdir, step)

    def take_step(step: int, state) -> step_loop.StepOutcome:
        """One rollout with the current policy, then `rl.epochs x rl.minibatches` updates on it."""
        started = time.perf_counter()
        step_prompts = next(run_state)
        rollout = roller(state.params, state.frozen, step_prompts, jax.random.fold_in(run_key, step))
        run_state.counters["bad_rewards"] = rewards.bad_count
        generated = time.perf_counter()
        update_metrics = []
        for minibatch in minibatches(rollout.batch, config, step):
            if run_state.ptx is not None:
                minibatch.update({f"ptx_{k}": v for k, v in next(run_state.ptx).items()})
            if step == start_step + 1 and not update_metrics:
                step_lib.check_batch(minibatch, config, mesh, objective)
            state, metrics = train_step(state, partitioning.global_batch(minibatch, batch_sharding))
            guard.record(metrics)
            update_metrics.append(metrics)
        values = mean_metrics(jax.device_get(update_metrics), epochs=int(config.rl.epochs))
        updated = time.perf_counter()

        def extra() -> dict[str, Any]:
            return {**rollout.metrics, **prompt_iter.counts(), "bad_rewards": rewards.bad_count,
                    **timing(rollout, started, generated, updated)}

        return step_loop.StepOutcome(state, values, extra)

    return step_loop.run_steps(
        take_step, state, start_step=start_step, config=config, mesh=mesh, data_iter=run_state, checkpoints=checkpoints,
        reporter=reporter, guard=guard, preemption=preemption, evaluate=evaluate, fingerprints=fingerprints,
        config_changes=config_changes,
    )


def train_tasks(config) -> list[Any]:
    """The leaf tasks of the prompt mixture (each must suit the rewards)."""
    from flan_jax import data

    source = data.get(config.data.train_mixture)
    return [source] if isinstance(source, data.Task) else list(source.tasks)


def build_ptx_iterator(config, tokenizer):
    """PPO-ptx: the SFT loader on `rl.ptx_mixture`, `rl.ptx_batch_size` packed rows per update."""
    ptx_config = config.copy_and_resolve_references()
    with ptx_config.unlocked():
        ptx_config.data.train_mixture = str(config.rl.ptx_mixture)
        ptx_config.data.batch_size = int(config.rl.ptx_batch_size)
    return train_loop.build_train_iterator(ptx_config, tokenizer)


def minibatches(batch: Mapping[str, np.ndarray], config, step: int) -> list[dict[str, np.ndarray]]:
    """The updates of one rollout: `rl.epochs` passes over `rl.minibatches` row subsets (reshuffled
    each epoch by (seed, step, epoch); whole rows, so a completion never splits)."""
    rows = next(iter(batch.values())).shape[0]
    count, epochs = int(config.rl.minibatches), int(config.rl.epochs)
    out = []
    for epoch in range(epochs):
        order = np.arange(rows) if count == 1 else np.random.default_rng([int(config.seed), step, epoch]).permutation(rows)
        for part in np.split(order, count):
            out.append({k: np.ascontiguousarray(v[np.sort(part)]) for k, v in batch.items()})
    return out


# Counts of what one update saw; the step's record reports them for the whole rollout instead.
ROLLOUT_COUNTS = ("completions", "completion_tokens")


def mean_metrics(per_update: list[Mapping[str, Any]], epochs: int = 1) -> dict[str, Any]:
    """One record for the step: objective metrics averaged over its updates, counters from the last,
    and the ROLLOUT_COUNTS summed over one epoch's minibatches (every completion counted once)."""
    last = dict(per_update[-1])
    if len(per_update) == 1:
        return last
    for key in last:
        values = [np.asarray(m[key], np.float64) for m in per_update]
        if key in ROLLOUT_COUNTS:
            last[key] = np.sum(values) / epochs
        elif key not in ("skipped_steps", "first_nonfinite_step", "learning_rate"):
            last[key] = np.mean(values)
    return last


def timing(rollout: rollout_lib.Rollout, started: float, generated: float, updated: float) -> dict[str, float]:
    """How a step's time splits between the rollout (generation + rewards + scoring pass) and the updates."""
    tokens = sum(len(c.tokens) for c in rollout.completions)
    total = max(updated - started, 1e-9)
    generation = rollout.metrics["generation_seconds"]
    return {
        "rollout_seconds": generated - started,
        "generation_seconds": generation,
        "update_seconds": updated - generated,
        "generation_share": generation / total,
        "rollout_tokens_per_sec": tokens / max(generation, 1e-9),
    }
