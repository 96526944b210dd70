"""Where every array of a training run lives: the device mesh and the shardings built on it.

The model names its parameter dimensions with logical axes (`logical_axes` metadata on each
`nnx.Param`); `config.mesh.axis_rules` maps those names to the mesh axes `data`, `fsdp` and
`tensor` (see `flan_jax/sharding.py`). This module turns both into `NamedSharding`s for the
parameters, the optimizer state and the batches, so the trainer can jit its step with explicit
in/out shardings and the same code runs on one CPU or a pod.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from flan_jax import sharding

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("batch", "length")


def make_mesh(mesh_config: Any, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, tensor) mesh; one axis may be -1 to take the remaining devices.

    Axes are `AxisType.Auto` so GSPMD propagates shardings from our explicit constraints
    (the default `Explicit` axes would require sharding-aware code everywhere).
    """
    devices = list(jax.devices() if devices is None else devices)
    sizes = [int(getattr(mesh_config, name)) for name in MESH_AXES]
    if sizes.count(-1) > 1:
        raise ValueError(f"config.mesh: at most one axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    fixed = math.prod(s for s in sizes if s != -1)
    if any(s == 0 or s < -1 for s in sizes) or len(devices) % fixed:
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} does not fit {len(devices)} devices "
            "(the product of the fixed axis sizes must divide the device count)."
        )
    sizes = [len(devices) // fixed if s == -1 else s for s in sizes]
    if math.prod(sizes) != len(devices):
        raise ValueError(
            f"config.mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices, "
            f"but {len(devices)} are available; set one axis to -1 to use them all."
        )
    return jax.make_mesh(
        tuple(sizes), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 3, devices=devices
    )


def axis_rules(mesh_config: Any) -> tuple[tuple[str, sharding.MeshAxes], ...]:
    """The rules table from the config, normalised (JSON round trips turn tuples into lists)."""
    rules = []
    for name, axes in mesh_config.axis_rules:
        if isinstance(axes, list):
            axes = tuple(axes)
        rules.append((name, axes))
    return tuple(rules)


def param_logical_axes(params: nnx.State) -> dict:
    """Pure-dict tree of each parameter's logical axis names, read from its metadata.

    A parameter without `logical_axes` metadata is replicated, and named in a warning: on a
    large model that is a memory problem worth seeing, not hiding.
    """
    missing = []

    def axes_of(path, variable):
        names = getattr(variable, "logical_axes", None)
        if names is None:
            missing.append("/".join(map(str, path)))
            return (None,) * len(variable.shape)
        return tuple(names)

    tree: dict = {}
    for path, variable in nnx.to_flat_state(params):
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = axes_of(path, variable)
    if missing:
        logging.warning("Parameters without logical_axes metadata (replicated): %s", missing)
    return tree


def _is_axes(x: Any) -> bool:
    return isinstance(x, tuple) and all(a is None or isinstance(a, str) for a in x)


def param_shardings(abstract_params: Any, logical_axes: Any, mesh: Mesh, rules: sharding.AxisRules) -> Any:
    """NamedSharding per parameter following the logical-axis rules (indivisible dims replicate)."""
    return jax.tree.map(
        lambda axes, p: sharding.named_sharding(mesh, axes, rules, p.shape),
        logical_axes,
        abstract_params,
        is_leaf=_is_axes,
    )


def opt_state_shardings(
    tx: optax.GradientTransformation, abstract_params: Any, params_sharding: Any, mesh: Mesh
) -> Any:
    """Shardings for the optimizer state: moments like their parameter, everything else replicated.

    Needed because `jax.jit(tx.init)` would otherwise put the whole state on one device
    (zeros_like drops the sharding). Adafactor's factored moments have other shapes than their
    parameter; they are small vectors and are replicated.
    """
    replicated = NamedSharding(mesh, PartitionSpec())
    abstract_state = jax.eval_shape(tx.init, abstract_params)

    def like_param(leaf, param, param_sharding):
        if getattr(leaf, "shape", None) == param.shape:
            return param_sharding
        return replicated

    return optax.tree_utils.tree_map_params(
        tx,
        like_param,
        abstract_state,
        abstract_params,
        params_sharding,
        transform_non_params=lambda _: replicated,
    )


def batch_sharding(mesh: Mesh, rules: sharding.AxisRules) -> NamedSharding:
    """Rows over the data-parallel axes (data + fsdp by default), sequence positions replicated."""
    return sharding.named_sharding(mesh, BATCH_AXES, rules)


def global_batch(local_batch: Mapping[str, np.ndarray], batch_sharding_: NamedSharding) -> dict:
    """Global jax arrays from this process's rows (`local = global / process_count` rows)."""
    out = {}
    for key, value in local_batch.items():
        value = np.asarray(value)
        global_shape = (value.shape[0] * jax.process_count(), *value.shape[1:])
        out[key] = jax.make_array_from_process_local_data(batch_sharding_, value, global_shape)
    return out
