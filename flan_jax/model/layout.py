"""The two layouts of a model's layer parameters, and the exact conversion between them.

    unrolled   {"layers": {0: {<block params>}, 1: {...}, ...}}    an nnx.List of blocks
    stacked    {"layers": {<block params, each with a leading [n_layers] axis>}}

`config.model.scan_layers` chooses the layout a model is built in (`layer_stack.py` runs it). In
the stacked layout a parameter's path is `layers/<path inside the block>` and its logical axes
are `("layers", *the block's axes)`; layer i of the stack is index i of that leading axis.

Stored parameters may be in either layout (trainer checkpoints, converted checkpoints, a
hand-saved tree), so every loader converts to the layout of the model it builds: Orbax restore
(`flan_jax.train.checkpointing`), `checkpoint.init_from` and `flan_jax.convert`. `to_layout`
rewrites every `"layers"` subtree of ANY pytree, at any depth, so the same call converts the
params, the AdamW moments that mirror them (inside optax's NamedTuples), the abstract
`ShapeDtypeStruct`s Orbax restores into (with their shardings), and an encoder-decoder's two
stacks (`{"encoder": {"layers": ...}, "decoder": {"layers": ...}}`). It only stacks and indexes,
so a round trip is bitwise exact.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

LAYERS = "layers"


def _is_index(key: Any) -> bool:
    return isinstance(key, int) or (isinstance(key, str) and key.isdigit())


def _is_unrolled(layers: Mapping) -> bool:
    return bool(layers) and all(_is_index(k) for k in layers)


def is_stacked(tree: Any) -> bool | None:
    """True / False for the layout of the first `"layers"` subtree of `tree`; None if it has none."""
    found = _find_layers(_plain(tree))
    return None if found is None else not _is_unrolled(found)


def to_layout(tree: Any, *, stacked: bool) -> Any:
    """`tree` with every `"layers"` subtree in the stacked (True) or unrolled (False) layout.

    Subtrees already in that layout are kept as they are. Leaves may be numpy arrays, jax arrays
    (also tracers, so this runs inside `jax.jit`), `jax.ShapeDtypeStruct`s (shapes and
    NamedShardings follow: the layer axis is replicated) or non-array placeholders such as
    optax's `MaskedNode`, which must then be the same for every layer.
    """
    return _convert(_plain(tree), stacked)


def stack(tree: Any) -> Any:
    return to_layout(tree, stacked=True)


def unstack(tree: Any) -> Any:
    return to_layout(tree, stacked=False)


def stack_flat(flat: dict[tuple, Any]) -> dict[tuple, Any]:
    """Stacks a flat {path: numpy array} dict with per-layer paths `(*stack, "layers", i, *rest)`.

    Every stack (the decoder's top-level `layers`, T5's `encoder/layers` and `decoder/layers`) is
    stacked over the layer indices it holds, which must be 0..n-1 for every parameter of it. The
    same result as `stack` on the nested dict, but each per-layer array is dropped from `flat`
    (which is emptied) as soon as its stack is built, so converting a large model on the host
    needs one stacked parameter more than the model, not a second model.
    """
    def split(path: tuple) -> tuple[tuple, int, tuple] | None:  # (stack prefix, layer index, rest)
        if LAYERS in path:
            at = path.index(LAYERS)
            if at + 1 < len(path) and _is_index(path[at + 1]):
                return path[:at + 1], int(path[at + 1]), path[at + 2:]
        return None

    stacks: dict[tuple, dict[tuple, dict[int, tuple]]] = {}  # stack prefix -> rest -> {layer index: path}
    for path in flat:
        parts = split(path)
        if parts is not None:
            prefix, index, rest = parts
            stacks.setdefault(prefix, {}).setdefault(rest, {})[index] = path
    out = {p: flat.pop(p) for p in list(flat) if split(p) is None}
    for prefix, rests in stacks.items():
        n = max(max(paths) for paths in rests.values()) + 1
        for rest, paths in rests.items():
            missing = sorted(set(range(n)) - set(paths))
            if missing:
                name = "/".join(map(str, (*prefix, *rest)))
                raise ValueError(f"cannot stack {name}: no layer(s) {missing[:3]} of the {n} in {'/'.join(map(str, prefix))}")
            out[(*prefix, *rest)] = np.stack([flat.pop(paths[i]) for i in range(n)])
    flat.clear()
    return out


def to_layout_placed(tree: Any, like: Any) -> Any:
    """`tree`'s arrays converted to the layout of `like` and placed in `like`'s shardings.

    `like` is a tree of `jax.ShapeDtypeStruct`s with shardings (what a restore targets). One jit
    does the conversion on the devices, so no host copy of the model is made. Raises a ValueError
    naming the first leaf whose converted shape differs from `like` (e.g. an optimizer whose state
    shapes depend on the layout).
    """
    stacked = is_stacked(like)
    if stacked is None or is_stacked(tree) in (None, stacked):
        return tree
    shardings = jax.tree.map(lambda s: s.sharding, like)
    converted = jax.jit(lambda t: to_layout(t, stacked=stacked), out_shardings=shardings)(tree)
    check_same_shapes(converted, like, what="layout conversion")
    return converted


def check_same_shapes(tree: Any, like: Any, *, what: str) -> None:
    """A ValueError naming the first path whose shape differs between `tree` and `like`."""
    got = jax.tree_util.tree_flatten_with_path(tree)[0]
    want = jax.tree_util.tree_flatten_with_path(like)[0]
    if len(got) != len(want):
        raise ValueError(f"{what}: {len(got)} arrays where {len(want)} were expected")
    for (path, a), (_, b) in zip(got, want):
        if tuple(np.shape(a)) != tuple(b.shape):
            raise ValueError(
                f"{what}: {jax.tree_util.keystr(path)} has shape {tuple(np.shape(a))}, expected {tuple(b.shape)}"
            )


# ---------------------------------------------------------------------- selecting by path
class PartialStackError(ValueError):
    """A selection (trainable paths, LoRA targets) that picks only some layers of a stacked array."""


def layer_names(name: str, n_layers: int) -> list[str] | None:
    """The per-layer names of a slash-joined stacked path ('layers/attn/q' -> 'layers/0/attn/q',
    ...), i.e. what the same parameter is called in the unrolled layout; None if not stacked."""
    parts = name.split("/")
    if LAYERS not in parts:
        return None
    at = parts.index(LAYERS)
    if at + 1 < len(parts) and _is_index(parts[at + 1]):
        return None
    return ["/".join([*parts[:at + 1], str(i), *parts[at + 1:]]) for i in range(n_layers)]


def layerwise(name: str, n_layers: int, selected: Callable[[str], bool], what: str) -> bool:
    """Whether `selected` (a predicate over unrolled names) picks the parameter `name`.

    A stacked parameter holds every layer's array as one, so it is picked when `selected` picks
    every one of its layer names, not picked when it picks none, and a PartialStackError names
    the layers otherwise: selections mean the same in both layouts, or fail, never differ.
    """
    names = layer_names(name, n_layers)
    if names is None:
        return selected(name)
    picked = [i for i, n in enumerate(names) if selected(n)]
    if len(picked) in (0, n_layers):
        return bool(picked)
    raise PartialStackError(
        f"{what} selects layers {picked} of the {n_layers} in {name}: with scanned layers "
        "(config.model.scan_layers) every layer's parameter is one stacked array, so a selection takes "
        "all layers or none. Select whole stacks, or set config.model.scan_layers=False to choose layers."
    )


# ---------------------------------------------------------------------- tree walking
def _plain(tree: Any) -> Any:
    """nnx.State -> its pure dict (the layout lives in the keys, not in Variable objects)."""
    from flax import nnx

    return nnx.to_pure_dict(tree) if isinstance(tree, nnx.State) else tree


def _children(node: Any) -> list[Any] | None:
    if isinstance(node, Mapping):
        return list(node.values())
    if isinstance(node, (tuple, list)):
        return list(node)
    return None


def _find_layers(node: Any) -> Mapping | None:
    if isinstance(node, Mapping) and isinstance(node.get(LAYERS), Mapping):
        return node[LAYERS]
    for child in _children(node) or ():
        found = _find_layers(child)
        if found is not None:
            return found
    return None


def _rebuild(node: Any, children: Sequence[Any]) -> Any:
    """A node of the same kind as `node` with new children (dicts keep their keys)."""
    if isinstance(node, Mapping):
        return dict(zip(node.keys(), children))
    if hasattr(node, "_fields"):  # a NamedTuple (optax states)
        return type(node)(*children)
    return type(node)(children)


def _convert(node: Any, stacked: bool) -> Any:
    if isinstance(node, Mapping):
        out = {}
        for key, value in node.items():
            if key == LAYERS and isinstance(value, Mapping):
                out[key] = _stack_layers(value) if stacked else _unstack_layers(value)
            else:
                out[key] = _convert(value, stacked)
        return out
    children = _children(node)
    if children is None:
        return node
    return _rebuild(node, [_convert(c, stacked) for c in children])


def _stack_layers(layers: Mapping) -> Any:
    if not _is_unrolled(layers):
        return _convert(layers, True)  # already stacked (nested stacks inside still converted)
    by_index = {int(k): v for k, v in layers.items()}
    n = len(by_index)
    if sorted(by_index) != list(range(n)):
        raise ValueError(f"layers {sorted(by_index)} are not 0..{n - 1}: cannot stack them")
    return _zip([_convert(by_index[i], True) for i in range(n)], _stack_leaves)


def _unstack_layers(layers: Mapping) -> Any:
    if _is_unrolled(layers):
        return {int(k): _convert(v, False) for k, v in layers.items()}
    n = _leading_size(layers)
    return {i: _convert(_index(layers, i), False) for i in range(n)}


def _zip(trees: Sequence[Any], leaf_fn: Callable[[list[Any]], Any]) -> Any:
    first = trees[0]
    if isinstance(first, Mapping):
        keys = list(first.keys())
        for t in trees[1:]:
            if not isinstance(t, Mapping) or set(t.keys()) != set(keys):
                raise ValueError(f"layers differ in structure: {keys} vs {list(t.keys()) if isinstance(t, Mapping) else t}")
        return {k: _zip([t[k] for t in trees], leaf_fn) for k in keys}
    children = _children(first)
    if children is not None:
        return _rebuild(first, [_zip([_children(t)[i] for t in trees], leaf_fn) for i in range(len(children))])
    return leaf_fn(list(trees))


def _index(node: Any, i: int) -> Any:
    children = _children(node)
    if children is not None:
        return _rebuild(node, [_index(c, i) for c in children])
    return _index_leaf(node, i)


def _leading_size(node: Any) -> int:
    for leaf in jax.tree.leaves(node):
        if hasattr(leaf, "shape") and len(leaf.shape):
            return int(leaf.shape[0])
    raise ValueError("a stacked 'layers' subtree holds no array to read the number of layers from")


# ---------------------------------------------------------------------- leaves
def _stack_leaves(leaves: list[Any]) -> Any:
    first = leaves[0]
    if isinstance(first, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct((len(leaves), *first.shape), first.dtype, sharding=_with_layer_axis(first.sharding))
    if isinstance(first, jax.Array):
        return jnp.stack(leaves)
    if isinstance(first, (np.ndarray, np.generic)):
        return np.stack(leaves)
    if any(leaf != first for leaf in leaves[1:]):
        raise ValueError(f"non-array leaves differ between layers: {leaves}")
    return first


def _index_leaf(leaf: Any, i: int) -> Any:
    if isinstance(leaf, jax.ShapeDtypeStruct):
        return jax.ShapeDtypeStruct(leaf.shape[1:], leaf.dtype, sharding=_without_layer_axis(leaf.sharding))
    if isinstance(leaf, (jax.Array, np.ndarray)):
        return leaf[i]
    return leaf


def _with_layer_axis(sharding: Any) -> Any:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(None, *sharding.spec))
    return sharding


def _without_layer_axis(sharding: Any) -> Any:
    if isinstance(sharding, NamedSharding):
        return NamedSharding(sharding.mesh, PartitionSpec(*tuple(sharding.spec)[1:]))
    return sharding
