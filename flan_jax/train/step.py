"""The jitted train step, shared by every objective.

The step computes the objective's loss (train/objectives: SFT, reward model, DPO, ...) and its
gradient over micro-batches, clips and applies the update, and keeps the non-finite bookkeeping;
the state is a `train.state.TrainState`.

A non-finite update is never applied: the step keeps the old params/opt_state with a
`where` inside jit, so checking for it needs no host sync per step. With
`on_nonfinite="stop"` every update after the first bad step is frozen too, and the loop stops
at its next check with a message naming that step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flan_jax import sharding
from flan_jax.train import objectives as objectives_lib, partitioning, xla_options
from flan_jax.train.state import ModelParts, TrainState


def _micro_batches(batch: Mapping[str, jax.Array], count: int) -> dict:
    """[B, L] -> [count, B/count, L] with micro-batch i = rows i, i+count, ...

    Interleaving keeps every micro-batch spread over all data-parallel devices.
    """
    def split(x):
        rows = x.shape[0]
        return jnp.swapaxes(x.reshape(rows // count, count, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def _batch_axes(ndim: int) -> tuple[str | None, ...]:
    """Logical axes of a batch feature: rows, then positions, then anything else replicated."""
    return (*partitioning.BATCH_AXES, *(None,) * ndim)[:ndim]


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: Any,
    shardings: TrainState,
    mesh: Mesh,
    rules: sharding.AxisRules,
    objective: objectives_lib.Objective | None = None,
) -> Callable[[TrainState, dict], tuple[TrainState, dict]]:
    """jit(step) with explicit in/out shardings and the state buffers donated.

    `objective` defaults to the one `config.objective.name` selects.
    """
    objective = objective or objectives_lib.get_objective(config)
    accum = int(config.optimizer.grad_accum_steps)
    stop_on_nonfinite = config.train.on_nonfinite == "stop"
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.train.on_nonfinite={config.train.on_nonfinite!r}: expected 'stop' or 'skip'")

    def loss_sum(params, frozen, batch, rng):
        ctx = objectives_lib.ObjectiveContext(parts=parts, params=params, frozen_params=frozen, rng=rng)
        return objective.loss_sum(ctx, batch)

    grad_fn = jax.value_and_grad(loss_sum, has_aux=True)

    def gradients(params, frozen, batch, rng):
        if accum == 1:
            return grad_fn(params, frozen, batch, rng)
        micro = _micro_batches(batch, accum)

        def body(carry, xs):
            index, mb = xs
            mb = {k: sharding.constrain(v, _batch_axes(v.ndim)) for k, v in mb.items()}
            (value, metric_sums), grads = grad_fn(params, frozen, mb, jax.random.fold_in(rng, index))
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return jax.tree.map(jnp.add, carry, ((value, metric_sums), grads)), None

        # Accumulated in float32 whatever the parameter dtype (bf16 sums lose small gradients).
        first = jax.tree.map(lambda v: v[0], micro)
        aux_shapes = jax.eval_shape(lambda: grad_fn(params, frozen, first, rng)[0])
        zeros = (
            jax.tree.map(lambda s: jnp.zeros(s.shape, jnp.float32), aux_shapes),
            jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params),
        )
        carry, _ = jax.lax.scan(body, zeros, (jnp.arange(accum), micro))
        return carry

    def step(state: TrainState, batch):
        rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
        with sharding.use_rules(mesh, rules):
            prepared = objective.prepare(batch)
            full_batch = {**batch, **prepared.features}
            (total, metric_sums), grads = gradients(state.params, state.frozen, full_batch, rng)
        denominator = prepared.denominator
        loss = total / denominator
        grads = jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (state.first_nonfinite_step < 0) if stop_on_nonfinite else finite
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
        new_state = state.replace(
            params=keep(params, state.params),
            opt_state=keep(opt_state, state.opt_state),
            step=state.step + 1,
            nonfinite_steps=state.nonfinite_steps + (~finite).astype(jnp.int32),
            first_nonfinite_step=jnp.where(
                (state.first_nonfinite_step < 0) & ~finite, state.step + 1, state.first_nonfinite_step
            ),
        )
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # The rate this update used: optax counts applied updates only (skipped ones do not count).
            "learning_rate": schedule(state.step - state.nonfinite_steps),
            "skipped_steps": new_state.nonfinite_steps,
            "first_nonfinite_step": new_state.first_nonfinite_step,
            **prepared.metrics,
            **{name: value / denominator for name, value in metric_sums.items()},
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
        compiler_options=xla_options.train_step_options(parts, config.model.dtype, mesh.devices.flat[0].platform) or None,
    )


def check_batch(
    batch: Mapping[str, np.ndarray], config: Any, mesh: Mesh, objective: objectives_lib.Objective | None = None
) -> None:
    """Clear errors for a batch the step cannot take (before jax reports a shape mismatch)."""
    objective = objective or objectives_lib.get_objective(config)
    missing = [k for k in objective.features if k not in batch]
    if missing:
        raise KeyError(
            f"Training batch lacks {missing}, which config.objective.name={objective.name!r} needs for "
            f"config.model.family={config.model.family!r} (its feature converter's batch, "
            f"flan_jax/data/converters/); got {sorted(batch)}"
        )
    rows = next(iter(batch.values())).shape[0] * jax.process_count()
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = int(config.optimizer.grad_accum_steps)
    if rows % (accum * data_parallel):
        raise ValueError(
            f"config.data.batch_size={rows} must be divisible by optimizer.grad_accum_steps ({accum}) "
            f"x the data-parallel devices (mesh data*fsdp = {data_parallel})."
        )
