"""The train state and the jitted train step.

The state is a plain dict pytree so Orbax, optax and jit all see ordinary arrays:

  params        the model's `nnx.Param`s as a pure dict (the NNX graph is kept aside and
                merged back inside the step)
  opt_state     the optax state
  step          number of steps taken (skipped ones included: their batches were consumed)
  rng           raw PRNG key data, folded with the step for any randomness in the step
  nonfinite_steps       how many updates were skipped for a non-finite loss or gradient
  first_nonfinite_step  the first such step, -1 if none

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
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flan_jax import sharding
from flan_jax.train import losses, partitioning

BATCH_KEYS = ("input_tokens", "target_tokens", "segment_ids", "positions", "loss_weights", "prefix_mask")


class ModelParts:
    """A model split into its NNX graph, parameter layout and non-parameter state.

    Built abstractly (no parameter memory) so shardings are known before anything is allocated.
    """

    def __init__(self, model_fn: Callable[[], nnx.Module], mesh: Mesh, rules: sharding.AxisRules):
        self.model_fn = model_fn
        with jax.set_mesh(mesh):
            abstract = nnx.eval_shape(model_fn)
        self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
        self.logical_axes = partitioning.param_logical_axes(abstract_params)
        self.abstract_params = nnx.to_pure_dict(abstract_params)
        self.param_shardings = partitioning.param_shardings(self.abstract_params, self.logical_axes, mesh, rules)
        # Non-Param state (e.g. constant buffers): treated as constants of the step. Only it
        # is returned, so XLA drops the parameter initialisation from this computation.
        with jax.set_mesh(mesh):
            self.rest = jax.jit(lambda: nnx.split(model_fn(), nnx.Param, ...)[2])()

    def merge(self, params: Any) -> nnx.Module:
        return nnx.merge(self.graphdef, params, self.rest)


def state_shardings(parts: ModelParts, tx: optax.GradientTransformation, mesh: Mesh) -> dict:
    replicated = NamedSharding(mesh, PartitionSpec())
    return {
        "params": parts.param_shardings,
        "opt_state": partitioning.opt_state_shardings(tx, parts.abstract_params, parts.param_shardings, mesh),
        "step": replicated,
        "rng": replicated,
        "nonfinite_steps": replicated,
        "first_nonfinite_step": replicated,
    }


def _fresh_state(params: Any, tx: optax.GradientTransformation, seed: int) -> dict:
    """The state of step 0 around the given params (the layout the module docstring describes)."""
    return {
        "params": params,
        "opt_state": tx.init(params),
        "step": jnp.zeros((), jnp.int32),
        "rng": jax.random.key_data(jax.random.key(seed)),
        "nonfinite_steps": jnp.zeros((), jnp.int32),
        "first_nonfinite_step": jnp.full((), -1, jnp.int32),
    }


def init_state(
    parts: ModelParts, tx: optax.GradientTransformation, shardings: dict, seed: int, mesh: Mesh
) -> dict:
    """Initialises params and optimizer state directly into their shardings (no host copy)."""

    def init():
        params = nnx.to_pure_dict(nnx.split(parts.model_fn(), nnx.Param, ...)[1])
        return _fresh_state(params, tx, seed)

    with jax.set_mesh(mesh):
        return jax.jit(init, out_shardings=shardings)()


def abstract_state(parts: ModelParts, tx: optax.GradientTransformation, shardings: dict, seed: int) -> dict:
    """ShapeDtypeStructs carrying the target shardings: what Orbax restores into."""
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), parts.abstract_params)  # noqa: E731
    shapes = jax.eval_shape(lambda: _fresh_state(zeros(), tx, seed))
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings)


def _micro_batches(batch: Mapping[str, jax.Array], count: int) -> dict:
    """[B, L] -> [count, B/count, L] with micro-batch i = rows i, i+count, ...

    Interleaving keeps every micro-batch spread over all data-parallel devices.
    """
    def split(x):
        rows = x.shape[0]
        return jnp.swapaxes(x.reshape(rows // count, count, *x.shape[1:]), 0, 1)

    return {k: split(v) for k, v in batch.items()}


def make_train_step(
    parts: ModelParts,
    tx: optax.GradientTransformation,
    schedule: optax.Schedule,
    config: Any,
    shardings: dict,
    mesh: Mesh,
    rules: sharding.AxisRules,
) -> Callable[[dict, dict], tuple[dict, dict]]:
    """jit(step) with explicit in/out shardings and the state buffers donated."""
    accum = int(config.optimizer.grad_accum_steps)
    stop_on_nonfinite = config.train.on_nonfinite == "stop"
    if config.train.on_nonfinite not in ("stop", "skip"):
        raise ValueError(f"config.train.on_nonfinite={config.train.on_nonfinite!r}: expected 'stop' or 'skip'")
    use_prefix = bool(config.data.prefix_lm)

    def loss_sum(params, batch, weights):
        model = parts.merge(params)
        inputs = dict(
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            prefix_mask=batch["prefix_mask"] if use_prefix else None,
        )
        if hasattr(model, "hidden_states"):  # the loss owns the head matmul (faster backward)
            hidden, head = model.hidden_states(batch["input_tokens"], **inputs)
            return losses.weighted_head_loss_sum(hidden, head, batch, weights, config.loss)
        return losses.weighted_loss_sum(model(batch["input_tokens"], **inputs), batch, weights, config.loss)

    grad_fn = jax.value_and_grad(loss_sum)

    def gradients(params, batch, weights):
        if accum == 1:
            return grad_fn(params, batch, weights)
        micro = _micro_batches({**batch, "__weights": weights}, accum)

        def body(carry, mb):
            mb = {k: sharding.constrain(v, partitioning.BATCH_AXES) for k, v in mb.items()}
            value, grads = grad_fn(params, mb, mb["__weights"])
            grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
            return jax.tree.map(jnp.add, carry, (value, grads)), None

        # Accumulated in float32 whatever the parameter dtype (bf16 sums lose small gradients).
        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params))
        (value, grads), _ = jax.lax.scan(body, zeros, micro)
        return value, grads

    def step(state, batch):
        with sharding.use_rules(mesh, rules):
            weights, denominator = losses.token_weights(batch, config.loss.normalization)
            total, grads = gradients(state["params"], batch, weights)
        loss = total / denominator
        grads = jax.tree.map(lambda g: g / denominator, grads)
        grad_norm = optax.tree.norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)

        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
        apply = finite & (state["first_nonfinite_step"] < 0) if stop_on_nonfinite else finite
        keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(apply, n, o), new, old)  # noqa: E731
        new_state = {
            "params": keep(params, state["params"]),
            "opt_state": keep(opt_state, state["opt_state"]),
            "step": state["step"] + 1,
            "rng": state["rng"],
            "nonfinite_steps": state["nonfinite_steps"] + (~finite).astype(jnp.int32),
            "first_nonfinite_step": jnp.where(
                (state["first_nonfinite_step"] < 0) & ~finite, state["step"] + 1, state["first_nonfinite_step"]
            ),
        }
        metrics = {
            "loss": loss,
            "grad_norm": grad_norm,
            # The rate this update used: optax counts applied updates only (skipped ones do not count).
            "learning_rate": schedule(state["step"] - state["nonfinite_steps"]),
            "loss_weight_sum": jnp.sum(batch["loss_weights"].astype(jnp.float32)),
            "skipped_steps": new_state["nonfinite_steps"],
            "first_nonfinite_step": new_state["first_nonfinite_step"],
        }
        return new_state, metrics

    replicated = NamedSharding(mesh, PartitionSpec())
    batch_sharding = partitioning.batch_sharding(mesh, rules)
    return jax.jit(
        step,
        in_shardings=(shardings, batch_sharding),
        out_shardings=(shardings, replicated),
        donate_argnums=(0,),
    )


def check_batch(batch: Mapping[str, np.ndarray], config: Any, mesh: Mesh) -> None:
    """Clear errors for a batch the step cannot take (before jax reports a shape mismatch)."""
    missing = [k for k in BATCH_KEYS if k not in batch]
    if missing:
        raise KeyError(f"Training batch lacks {missing} (design.md §4 lists the batch fields); got {sorted(batch)}")
    rows = batch["input_tokens"].shape[0] * jax.process_count()
    data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
    accum = int(config.optimizer.grad_accum_steps)
    if rows % (accum * data_parallel):
        raise ValueError(
            f"config.data.batch_size={rows} must be divisible by optimizer.grad_accum_steps ({accum}) "
            f"x the data-parallel devices (mesh data*fsdp = {data_parallel})."
        )
