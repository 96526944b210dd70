"""A model's layers as ONE stacked block run by `jax.lax.scan`: compile time independent of depth.

Unrolled (an `nnx.List` of blocks and a Python loop), XLA compiles every layer separately, so
compile time grows with depth: a Llama-3-8B shape took minutes on a CPU host and a 70B shape
did not finish (issue 21; benchmarks/aot_fit.py). Stacked, the blocks' variables are stacked
along a leading `[n_layers]` axis (logical axis `"layers"`, replicated by the default rules),
and one scan body serves every layer. `flan_jax.model.layout` converts stored parameters
between the two layouts.

Layers that differ (Gemma 2/3 alternate sliding-window and global attention) are described by
a static *kind* per layer (any hashable value, e.g. `transformer.LayerKind`). The kinds repeat
with some period p (1 when every layer is alike); the scan then runs over groups of p layers,
its body applying the p kinds of a group in order with each kind's static settings, and the
n_layers % p layers left over run unrolled after it (flax's gemma example and MaxText's gemma3
do the same with their attention types). Kinds that never repeat but come in long runs (Qwen's
full layers, then sliding ones) scan each run instead: `plan` picks whichever needs fewer layer
bodies compiled. The parameter layout does not depend on the grouping:
it is always `[n_layers, ...]` in layer order, so checkpoints, conversion and adapters need not
know about kinds. A setting that is an array rather than a static value (e.g. a per-layer rope
base) can be stacked like a parameter and read from the layer's slice inside the body.

Remat: with `remat=True`, every layer (not every group) is a `jax.checkpoint` with the given
policy, so the backward pass recomputes one layer at a time, as in the unrolled model.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

# body(layer, x, cache, layer_index, kind) -> (x, cache): one layer's computation. `cache` is
# whatever the caller carries through all layers (e.g. the stacked KV cache, or None) and
# `layer_index` a traced int32 (its position in the stack, to index that cache).
LayerBody = Callable[[nnx.Module, jax.Array, Any, jax.Array, Hashable], tuple[jax.Array, Any]]


def stack_modules(modules: Sequence[nnx.Module]) -> nnx.Module:
    """One module of `modules[0]`'s structure whose every variable is stacked along a new axis 0.

    The modules must be alike (same graph definition). Each stacked variable keeps its metadata,
    with `"layers"` prepended to its `logical_axes`. Built from separately initialised modules,
    so a stacked model and an unrolled one from the same seed hold the same numbers.
    """
    splits = [nnx.split(m) for m in modules]
    graphdef = splits[0][0]
    if any(g != graphdef for g, _ in splits[1:]):
        raise ValueError("stack_modules: the modules differ in structure")

    def stack_variable(*variables: nnx.Variable) -> nnx.Variable:
        first = variables[0]
        metadata = {}
        if first.has_metadata("logical_axes"):
            metadata["logical_axes"] = ("layers", *first.get_metadata("logical_axes"))
        return first.replace(jnp.stack([v.get_value() for v in variables]), **metadata)

    is_variable = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    stacked = jax.tree.map(stack_variable, *[s for _, s in splits], is_leaf=is_variable)
    return nnx.merge(graphdef, stacked)


def map_layers(stacked: nnx.Module, fn: Callable[[nnx.Module], Any]) -> Any:
    """`fn(layer)` for every layer of a stacked module, the outputs stacked along a new axis 0
    (one `lax.map`, so one compiled body; e.g. T5's per-layer cross-attention keys and values)."""
    graphdef, state = nnx.split(stacked)
    return jax.lax.map(lambda layer_state: fn(nnx.merge(graphdef, layer_state)), state)


def pattern_period(kinds: Sequence[Hashable]) -> int:
    """Smallest p with kinds[i] == kinds[i % p] for every layer (len(kinds) if none is shorter)."""
    n = len(kinds)
    for p in range(1, n + 1):
        if all(kinds[i] == kinds[i % p] for i in range(n)):
            return p
    return max(n, 1)


# One piece of the plan: layers [start, start + groups * period), run as `groups` repeats of a
# body of `period` layers (a scan when groups > 1, the layers unrolled otherwise).
Segment = tuple[int, int, int]  # (start, groups, period)


def plan(kinds: Sequence[Hashable]) -> list[Segment]:
    """How the stacked layers run: the plan with the fewest distinct layer bodies to compile.

    Periodic: one scan over groups of `pattern_period(kinds)` layers, then the leftover layers
    (Gemma 2's alternation, Gemma 3's 5 local + 1 global: one body per kind of the period). Runs:
    one scan per maximal run of equal kinds (e.g. Qwen's full layers followed by sliding ones,
    which never repeat). Either way the compiled size no longer grows with depth.
    """
    n = len(kinds)
    if not n:
        return []
    period = pattern_period(kinds)
    groups = n // period
    periodic = [(0, groups, period)] + ([(groups * period, 1, n - groups * period)] if n % period else [])
    runs: list[Segment] = []
    start = 0
    for i in range(1, n + 1):
        if i == n or kinds[i] != kinds[start]:
            runs.append((start, i - start, 1))
            start = i

    def cost(segments: list[Segment]) -> int:
        return sum(p for _, _, p in segments)

    return periodic if cost(periodic) <= cost(runs) else runs


def run_stacked(
    stacked: nnx.Module,
    kinds: Sequence[Hashable],
    body: LayerBody,
    x: jax.Array,
    cache: Any = None,
    *,
    remat: bool = False,
    policy: Callable | None = None,
) -> tuple[jax.Array, Any]:
    """Applies the stacked layers in order, segment by segment of `plan(kinds)`. Returns (x, cache)
    after the last layer."""
    graphdef, state = nnx.split(stacked)

    def layer(layer_state, x, cache, index, kind):
        return body(nnx.merge(graphdef, layer_state), x, cache, index, kind)

    def make(in_scan: bool):
        if not remat:
            return layer
        # Inside a scan nothing can be merged across iterations, so no CSE barrier is needed there.
        return jax.checkpoint(layer, policy=policy, prevent_cse=not in_scan, static_argnums=(4,))

    scanned_layer, unrolled_layer = make(True), make(False)

    for start, groups, period in plan(kinds):
        if groups == 1:
            for i in range(start, start + period):
                x, cache = unrolled_layer(jax.tree.map(lambda a: a[i], state), x, cache, jnp.int32(i), kinds[i])
            continue
        segment_kinds = kinds[start:start + period]

        def group(carry, xs, segment_kinds=segment_kinds, period=period):
            x, cache = carry
            group_state, first_index = xs
            for j in range(period):
                layer_state = group_state if period == 1 else jax.tree.map(lambda a: a[j], group_state)
                x, cache = scanned_layer(layer_state, x, cache, first_index + j, segment_kinds[j])
            return (x, cache), None

        def grouped(a, start=start, groups=groups, period=period):
            a = a[start:start + groups * period] if (start, groups * period) != (0, a.shape[0]) else a
            return a if period == 1 else a.reshape(groups, period, *a.shape[1:])

        xs = (jax.tree.map(grouped, state), start + jnp.arange(groups, dtype=jnp.int32) * period)
        (x, cache), _ = jax.lax.scan(group, (x, cache), xs)
    return x, cache
