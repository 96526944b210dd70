"""Logical axis names -> mesh axes: the only place that knows about both.

The model names each parameter dimension ("embed", "mlp", "heads", ...) and the key activation
dimensions ("batch", "length", "act_embed", ...). A small rules table (from the config) maps each
logical name to a mesh axis, a tuple of mesh axes, or None (replicated). So the model never names
a mesh axis and the trainer never names a model dimension: this is the t5x / MaxText design with
a rules table short enough to read.

Inside `use_rules(mesh, rules)` the model's `constrain(x, names)` calls become
`with_sharding_constraint`s; outside it (unit tests, generation on one device) they are no-ops.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator, Sequence

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MeshAxes = str | tuple[str, ...] | None
AxisRules = Sequence[tuple[str, MeshAxes]]

# Data parallel over ("data", "fsdp"), parameters sharded over "fsdp" along their embed dimension
# (ZeRO-3 style) and over "tensor" along heads / mlp / vocab (Megatron style). A scanned model's
# stacked parameters have a leading "layers" axis, replicated: the scan slices one layer's shard
# per iteration and FSDP gathers that layer only.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),  # the stacked layer axis of a scanned model: each device holds every layer's shard
    ("length", None),
    ("embed", "fsdp"),
    ("vocab", "tensor"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("positions", None),  # learned position embeddings (GPT-2): replicated rows
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
)


def logical_to_spec(
    names: Sequence[str | None],
    rules: AxisRules,
    *,
    shape: Sequence[int] | None = None,
    mesh: Mesh | None = None,
) -> PartitionSpec:
    """Maps logical dimension names to a PartitionSpec.

    A name missing from the rules is an error (a typo would otherwise silently replicate a
    7B-parameter matrix). A mesh axis is used at most once per array; a later dimension that
    asks for an already used axis is replicated instead, which is what GSPMD requires.
    With `shape` and `mesh`, a dimension whose size the mesh axes do not divide is replicated
    rather than failing at placement time (e.g. 2 KV heads on a tensor axis of 4).
    """
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for dim, name in enumerate(names):
        if name is None:
            spec.append(None)
            continue
        if name not in table:
            raise KeyError(
                f"Logical axis {name!r} has no entry in the axis rules {sorted(table)}; "
                "add it to config.mesh.axis_rules (map it to None to replicate)."
            )
        axes = table[name]
        axes_tuple = () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)
        axes_tuple = tuple(a for a in axes_tuple if a not in used)
        if mesh is not None:
            axes_tuple = tuple(a for a in axes_tuple if a in mesh.shape)
            if shape is not None:
                size = 1
                for a in axes_tuple:
                    size *= mesh.shape[a]
                if shape[dim] % size:
                    axes_tuple = ()
        used.update(axes_tuple)
        spec.append(None if not axes_tuple else axes_tuple[0] if len(axes_tuple) == 1 else axes_tuple)
    return PartitionSpec(*spec)


def named_sharding(
    mesh: Mesh, names: Sequence[str | None], rules: AxisRules, shape: Sequence[int] | None = None
) -> NamedSharding:
    """NamedSharding for an array whose dimensions carry the given logical names."""
    return NamedSharding(mesh, logical_to_spec(names, rules, shape=shape, mesh=mesh))


_ACTIVE = threading.local()


@contextlib.contextmanager
def use_rules(mesh: Mesh, rules: AxisRules) -> Iterator[None]:
    """Activates activation-sharding constraints for code traced inside this block."""
    previous = getattr(_ACTIVE, "value", None)
    _ACTIVE.value = (mesh, tuple(rules))
    try:
        yield
    finally:
        _ACTIVE.value = previous


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Hints XLA how an activation is laid out; a no-op outside `use_rules`."""
    active = getattr(_ACTIVE, "value", None)
    if active is None:
        return x
    mesh, rules = active
    return jax.lax.with_sharding_constraint(x, named_sharding(mesh, names, rules, x.shape))


def cast_sharded(x: jax.Array, dtype, names: Sequence[str | None] | None) -> jax.Array:
    """`x.astype(dtype)`, pinned to the layout `names` give (a parameter's own sharding).

    Why: left alone, XLA's sharding propagation moves an FSDP all-gather in front of the cast,
    so the gather moves the float32 master weights instead of the bf16 compute copy (twice the
    bytes on the interconnect). Pinning the cast's output to the still-sharded layout makes XLA
    cast first and gather the narrow copy. A no-op cast, or `names=None`, leaves x alone.
    """
    dtype = jax.numpy.dtype(dtype)
    if x.dtype == dtype:
        return x
    y = x.astype(dtype)
    return y if names is None else constrain(y, names)
