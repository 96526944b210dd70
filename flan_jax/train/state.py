"""The train state: one type for every kind of run, and where each of its arrays lives.

`TrainState` is a pytree (a `flax.struct` dataclass) that Orbax, optax and jit all see as ordinary
arrays:

  params                the parameters the optimizer trains, as a pure dict (the NNX graph is
                        kept aside in `ModelParts` and merged back inside the step)
  opt_state             the optax state of `params`
  frozen                named frozen parameter sets the objective reads but never trains:
                        "reference" (the initial policy, for DPO / PPO's KL term), "base" (the
                        parameters a trainable filter leaves out, e.g. LoRA's base). Not written
                        into the run's checkpoints: rebuilt at start from where they came from
                        (`checkpoint.init_from` or the seed) and checked by `fingerprint`.
  step                  number of steps taken (skipped ones included: their batches were consumed)
  rng                   raw PRNG key data, folded with the step for any randomness in the step
  nonfinite_steps       how many updates were skipped for a non-finite loss or gradient
  first_nonfinite_step  the first such step, -1 if none
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Mapping
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flan_jax import sharding
from flan_jax.model import layout
from flan_jax.train import partitioning

# The scalar bookkeeping of a run, saved together as one checkpoint item.
META_FIELDS = ("step", "rng", "nonfinite_steps", "first_nonfinite_step")
BASE = "base"  # the frozen slot of the parameters a trainable filter leaves out (train/trainable.py)


@flax.struct.dataclass
class TrainState:
    params: Any
    opt_state: Any
    step: jax.Array
    rng: jax.Array
    nonfinite_steps: jax.Array
    first_nonfinite_step: jax.Array
    frozen: dict = flax.struct.field(default_factory=dict)

    def meta(self) -> dict[str, Any]:
        """The bookkeeping fields (META_FIELDS) as a dict: one checkpoint item."""
        return {name: getattr(self, name) for name in META_FIELDS}


class ModelParts:
    """A model split into its NNX graph, parameter layout and non-parameter state.

    Built abstractly (no parameter memory) so shardings are known before anything is allocated.
    `trainable` (train/trainable.py) says which parameters the optimizer trains: `trained_*` are
    those, `base_*` the frozen rest (the "base" slot; empty when everything is trained), in the
    dtype it is held in.
    """

    def __init__(
        self, model_fn: Callable[[], nnx.Module], mesh: Mesh, rules: sharding.AxisRules, trainable: Any = None
    ):
        self.model_fn = model_fn
        with jax.set_mesh(mesh):
            abstract = nnx.eval_shape(model_fn)
        self.graphdef, abstract_params, _ = nnx.split(abstract, nnx.Param, ...)
        self.logical_axes = partitioning.param_logical_axes(abstract_params)
        self.abstract_params = nnx.to_pure_dict(abstract_params)
        self.param_shardings = partitioning.param_shardings(self.abstract_params, self.logical_axes, mesh, rules)
        self.selection = None if trainable is None else trainable.select(self.abstract_params, self.logical_axes)
        if self.selection is None or self.selection.everything:
            self.selection = None
            self.trained_abstract, self.trained_shardings = self.abstract_params, self.param_shardings
            self.base_abstract, self.base_shardings = {}, {}
        else:
            held = self.selection.held(self.abstract_params)
            self.trained_abstract = self.selection.trained_part(self.abstract_params)
            self.trained_shardings = self.selection.trained_part(self.param_shardings)
            self.base_abstract = self.selection.frozen_part(held)
            self.base_shardings = self.selection.frozen_part(self.param_shardings)
        # Non-Param state (e.g. constant buffers): treated as constants of the step. Only it
        # is returned, so XLA drops the parameter initialisation from this computation.
        with jax.set_mesh(mesh):
            self.rest = jax.jit(lambda: nnx.split(model_fn(), nnx.Param, ...)[2])()

    @property
    def has_base(self) -> bool:
        """Whether a trainable filter leaves parameters frozen (held in the "base" slot)."""
        return self.selection is not None

    def merge(self, params: Any, *more_params: Any) -> nnx.Module:
        """The module with `params` (and further disjoint parameter subsets, e.g. a frozen base)."""
        return nnx.merge(self.graphdef, params, *(p for p in more_params if p), self.rest)

    def init_params(self) -> dict:
        """Freshly initialised parameters (pure dict), for use inside a jitted function."""
        return nnx.to_pure_dict(nnx.split(self.model_fn(), nnx.Param, ...)[1])

    def trained_part(self, params: Any) -> Any:
        """The trained subset of a full parameter tree (the tree itself when everything trains)."""
        return params if self.selection is None else self.selection.trained_part(params)

    def base_part(self, params: Any) -> dict:
        """The frozen subset of a full parameter tree, cast to the dtype it is held in ({} if none)."""
        if self.selection is None:
            return {}
        frozen = self.selection.frozen_part(params)
        return jax.tree.map(lambda x, a: x.astype(a.dtype) if x.dtype != a.dtype else x, frozen, self.base_abstract)


def state_shardings(
    parts: ModelParts, tx: optax.GradientTransformation, mesh: Mesh, frozen_slots: tuple[str, ...] = ()
) -> TrainState:
    """A TrainState of NamedShardings: parameters by their logical axes, optimizer moments like
    their parameter, scalars replicated; the objective's frozen slots (a reference copy of the
    trained parameters) like the trained parameters, and when a trainable filter leaves
    parameters frozen, the "base" slot like them."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return TrainState(
        params=parts.trained_shardings,
        opt_state=partitioning.opt_state_shardings(tx, parts.trained_abstract, parts.trained_shardings, mesh),
        step=replicated,
        rng=replicated,
        nonfinite_steps=replicated,
        first_nonfinite_step=replicated,
        frozen={
            **{name: parts.trained_shardings for name in frozen_slots},
            **({BASE: parts.base_shardings} if parts.has_base else {}),
        },
    )


def fresh_state(params: Any, tx: optax.GradientTransformation, seed: int, frozen: Mapping[str, Any] | None = None) -> TrainState:
    """The state of step 0 around the given params."""
    return TrainState(
        params=params,
        opt_state=tx.init(params),
        step=jnp.zeros((), jnp.int32),
        rng=jax.random.key_data(jax.random.key(seed)),
        nonfinite_steps=jnp.zeros((), jnp.int32),
        first_nonfinite_step=jnp.full((), -1, jnp.int32),
        frozen=dict(frozen or {}),
    )


def init_state(
    parts: ModelParts, tx: optax.GradientTransformation, shardings: TrainState, seed: int, mesh: Mesh
) -> TrainState:
    """Initialises params and optimizer state directly into their shardings (no host copy).

    Frozen slots start empty; `with_frozen` fills them.
    """
    shardings = shardings.replace(frozen={})
    with jax.set_mesh(mesh):
        return jax.jit(lambda: fresh_state(parts.trained_part(parts.init_params()), tx, seed), out_shardings=shardings)()


def init_params(parts: ModelParts, mesh: Mesh) -> dict:
    """The seed's initial parameters, placed directly into their shardings."""
    with jax.set_mesh(mesh):
        return jax.jit(parts.init_params, out_shardings=parts.param_shardings)()


def init_base(parts: ModelParts, mesh: Mesh) -> dict:
    """The seed's initial frozen parameters only, in their held dtype and shardings (XLA drops
    the initialisation of the rest)."""
    with jax.set_mesh(mesh):
        return jax.jit(lambda: parts.base_part(parts.init_params()), out_shardings=parts.base_shardings)()


def abstract_state(parts: ModelParts, tx: optax.GradientTransformation, shardings: TrainState, seed: int) -> TrainState:
    """ShapeDtypeStructs carrying the target shardings: what Orbax restores into (no frozen slots)."""
    zeros = lambda: jax.tree.map(lambda p: jnp.zeros(p.shape, p.dtype), parts.trained_abstract)  # noqa: E731
    shapes = jax.eval_shape(lambda: fresh_state(zeros(), tx, seed))
    return jax.tree.map(
        lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh), shapes, shardings.replace(frozen={})
    )


def copy_params(params: Any) -> Any:
    """A copy in new buffers, same shardings (a frozen slot must survive the step's donation)."""
    return jax.tree.map(lambda x: jnp.copy(x), params)


@jax.jit
def _leaf_checksums(params: Any) -> list[jax.Array]:
    """Per array of the unrolled layout: sum over its bits (as uint32) x an odd, position-dependent
    multiplier (mod 2^32). A stacked layer axis is split inside the jit (no copy of the model)."""

    def checksum(x):
        unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32}.get(x.dtype.itemsize)
        if unsigned is None:
            raise TypeError(f"fingerprint: arrays of dtype {x.dtype} are not supported")
        bits = jax.lax.bitcast_convert_type(x, unsigned).astype(jnp.uint32).reshape(-1)
        weights = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) + jnp.uint32(0x9E3779B9)
        return jnp.sum(bits * weights, dtype=jnp.uint32)

    return [checksum(x) for x in jax.tree.leaves(layout.unstack(params))]


def fingerprint(params: Any) -> str:
    """A short digest of a parameter tree's paths, shapes, dtypes and values.

    Computed on the devices where the arrays live (one uint32 checksum per array; only those are
    fetched), so fingerprinting a sharded 8B model costs one pass over it, not a host copy. It
    tells a resumed run whether a frozen slot rebuilt from its source is the one the checkpoint
    was trained against; it is not a cryptographic hash. Computed over the unrolled layer layout,
    so it does not change with `config.model.scan_layers`.
    """
    flat = jax.tree_util.tree_flatten_with_path(jax.eval_shape(layout.unstack, params))[0]
    sums = jax.device_get(_leaf_checksums(params)) if flat else []
    digest = hashlib.sha256()
    for (path, leaf), value in zip(flat, sums):
        digest.update(f"{jax.tree_util.keystr(path)}|{tuple(leaf.shape)}|{leaf.dtype}|{int(np.asarray(value))};".encode())
    return digest.hexdigest()[:32]
