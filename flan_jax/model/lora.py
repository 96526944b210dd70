"""LoRA adapters (Hu et al. 2021, arXiv:2106.09685) on a model's projections, chosen by name.

    y = x W (+ b) + scale * dropout(x) A B        A: [*in, r] random, B: [r, *out] zero

`apply(model, LoRAConfig(rank=16, alpha=32, targets=("q", "v")), rngs=rngs)` swaps every matching
projection (a `transformer.Dense`: the decoder's q, k, v, o, gate, up, down; T5's projections are
the same class) for a `LoRADense`, which keeps the projection's own `kernel` / `bias` at the same
parameter paths (so converted checkpoints, sharding rules and exports still find them) and adds
`lora_a` / `lora_b` beside them. B starts at zero, so the adapted model computes exactly the base
model until the first update. `scale` is alpha / r, or alpha / sqrt(r) with `rslora`
(Kalajdzievski 2023), which keeps the update's size independent of the rank.

Why model surgery after the build rather than a LoRA switch inside every family: the families stay
unaware of adapters (a new family gets LoRA for free when it builds its projections with `Dense`),
and the trainer only sees more parameters, which its trainable-parameter filter
(flan_jax/train/trainable.py) then selects.

Layouts: adapters carry logical axes like their kernel (A: the kernel's input axes + an unnamed
rank axis; B: the rank axis + the kernel's output axes), so they shard by the same rules. A
projection inside stacked layers (kernel with leading `layers` axes, for a scan over layers) gets
adapters stacked the same way, so the scan slices them together with the kernel.

Dropout on the adapter input (as PEFT) draws from the training step's key: `train_mode(model, rng)`
gives every adapter its own key; without it (evaluation, generation, export) there is no dropout.

`adapters_off(model)` is the same model computing its base alone (PEFT's `disable_adapter()`):
DPO's reference in a LoRA run, the initial policy (B = 0) without a second copy of the weights.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Iterable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flan_jax.model import kernels, layout
from flan_jax.model.kernels.matmul import dense_dot, lora_dense_dot
from flan_jax.model.transformer import Dense

# The projections, by their module names (the decoder's; T5's attention and feed-forward use the
# same names). PEFT's names are aliases: Llama-style, and T5's (whose q, k, v, o are ours already;
# its feed-forward wi_0 / wi_1 / wo are gate / up / down, the original T5's single `wi` is up).
PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
PEFT_ALIASES = {
    "q_proj": "q", "k_proj": "k", "v_proj": "v", "o_proj": "o",
    "gate_proj": "gate", "up_proj": "up", "down_proj": "down",
    "wi_0": "gate", "wi_1": "up", "wi": "up", "wo": "down",
}
ALL_LINEAR = "all-linear"  # every projection the model has (PEFT's name; the output head excluded)
ADAPTER_NAMES = ("lora_a", "lora_b")
STACK_AXES = ("layers",)  # leading kernel axes of stacked (scanned) layers


class LoRAError(ValueError):
    """A LoRA setting that does not fit the model (no projection matched, rank too large, ...)."""


class DropoutKey(nnx.Variable):
    """The PRNG key data one adapter's dropout draws from in a training step (not a parameter)."""


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """Which projections get adapters, and of what size (`config.lora`)."""

    rank: int
    alpha: float = 16.0
    dropout: float = 0.0
    targets: tuple[str, ...] = (ALL_LINEAR,)
    rslora: bool = False

    def __post_init__(self) -> None:
        if int(self.rank) < 1:
            raise LoRAError(f"config.lora.rank={self.rank} must be >= 1 (0 turns LoRA off)")
        if not self.alpha > 0:
            raise LoRAError(f"config.lora.alpha={self.alpha} must be > 0")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"config.lora.dropout={self.dropout} must be in [0, 1)")
        if not self.targets:
            raise LoRAError("config.lora.targets is empty: name the projections to adapt (e.g. ('q', 'v'))")

    @property
    def scale(self) -> float:
        return float(self.alpha) / (math.sqrt(self.rank) if self.rslora else self.rank)

    @classmethod
    def from_config(cls, section: Any) -> LoRAConfig | None:
        """From `config.lora`; None when `rank` is 0 (LoRA off)."""
        if section is None or not int(section.get("rank", 0)):
            return None
        targets = section.get("targets", (ALL_LINEAR,))
        targets = (targets,) if isinstance(targets, str) else tuple(targets)
        return cls(
            rank=int(section.rank),
            alpha=float(section.get("alpha", 16.0)),
            dropout=float(section.get("dropout", 0.0)),
            targets=targets,
            rslora=bool(section.get("rslora", False)),
        )


class LoRADense(Dense):
    """A `Dense` plus a low-rank update; `kernel` and `bias` are the wrapped projection's own."""

    def __init__(self, dense: Dense, config: LoRAConfig, *, rngs: nnx.Rngs, name: str = ""):
        # Take over the projection's parameters (same Variables, same paths) and settings instead
        # of creating new ones: every public attribute of the wrapped Dense.
        for attribute, value in vars(dense).items():
            if not attribute.startswith("_"):
                setattr(self, attribute, value)
        axes = tuple(dense.kernel.get_metadata().get("logical_axes") or (None,) * dense.kernel.ndim)
        shape = tuple(dense.kernel.shape)
        stack = stacked_dims(axes)
        in_shape, out_shape = shape[stack:stack + self.n_in], shape[stack + self.n_in:]
        in_size, out_size = math.prod(in_shape), math.prod(out_shape)
        if config.rank > min(in_size, out_size):
            raise LoRAError(
                f"config.lora.rank={config.rank} is larger than projection {name or 'Dense'}'s dimensions "
                f"(in {in_size}, out {out_size}; kernel {shape}); a rank above min(in, out) adds nothing"
            )
        self.rank, self.scale = int(config.rank), config.scale
        self.dropout_rate = float(config.dropout)
        self.deterministic = True  # train_mode() switches dropout on for one training step's model
        self.enabled = True  # adapters_off() gives a view that computes the wrapped projection alone
        param_dtype = jnp.dtype(dense.kernel.dtype if jnp.issubdtype(dense.kernel.dtype, jnp.floating) else jnp.float32)
        # PEFT's default: A ~ kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(in), 1/sqrt(in)); B = 0.
        bound = 1.0 / math.sqrt(in_size)
        a = jax.random.uniform(rngs.params(), (*shape[:stack], *in_shape, self.rank), param_dtype, -bound, bound)
        self.lora_a = nnx.LoRAParam(a, logical_axes=(*axes[:stack], *axes[stack:stack + self.n_in], None))
        self.lora_b = nnx.LoRAParam(
            jnp.zeros((*shape[:stack], self.rank, *out_shape), param_dtype),
            logical_axes=(*axes[:stack], None, *axes[stack + self.n_in:]),
        )
        key_shape = jax.random.key_data(jax.random.key(0)).shape
        self.dropout_key = DropoutKey(jnp.zeros((*shape[:stack], *key_shape), jnp.uint32)) if self.dropout_rate else None

    def __call__(self, x: jax.Array) -> jax.Array:
        if not self.enabled:
            return super().__call__(x)
        if self.dropout_rate and not self.deterministic:
            return self._with_dropout(x)
        # x W + s x A B as one matmul over the merged kernel (kernels.matmul.lora_dense_dot says why).
        y = lora_dense_dot(x, self.kernel[...], self.lora_a[...], self.lora_b[...], self.scale, self.n_in,
                           self.dtype, self.axes)
        return y if self.bias is None else y + self.bias[...].astype(self.dtype)

    def _with_dropout(self, x: jax.Array) -> jax.Array:
        """x W (+ b) + s dropout(x) A B: the adapter sees another input than the base, so no merge."""
        y = super().__call__(x)
        keep = 1.0 - self.dropout_rate
        mask = jax.random.bernoulli(jax.random.wrap_key_data(self.dropout_key[...]), keep, x.shape)
        h = jnp.where(mask, x / jnp.asarray(keep, x.dtype), jnp.zeros((), x.dtype))
        impl = kernels.resolve(getattr(self, "kernel_choice", "auto"))  # the wrapped Dense's choice
        down = dense_dot(h, self.lora_a[...], self.n_in, self.dtype, impl)
        down = down * jnp.asarray(self.scale, down.dtype)
        return y + dense_dot(down, self.lora_b[...], 1, self.dtype, impl).astype(y.dtype)

    def delta(self) -> jax.Array:
        """scale * A B in the kernel's shape (float32): what merging adds to the kernel."""
        a, b = self.lora_a[...].astype(jnp.float32), self.lora_b[...].astype(jnp.float32)
        return merge_delta(a, b, self.scale, self.kernel.shape)


def stacked_dims(axes: Sequence[str | None]) -> int:
    """How many leading kernel axes are layer-stacking axes (0 for unstacked layers)."""
    count = 0
    while count < len(axes) and axes[count] in STACK_AXES:
        count += 1
    return count


def merge_delta(a, b, scale: float, kernel_shape: Sequence[int]):
    """scale * A B reshaped like the kernel (numpy or jax arrays, stacked or not).

    A is [*lead, *in, r], B [*lead, r, *out] and the kernel [*lead, *in, *out], so the number of
    shared leading (stacking) dims follows from the three ranks.
    """
    xp = jnp if isinstance(a, jax.Array) else np
    lead = a.ndim + b.ndim - 2 - len(kernel_shape)
    rank = a.shape[-1]
    a2 = a.reshape(*a.shape[:lead], -1, rank)
    b2 = b.reshape(*b.shape[:lead], rank, -1)
    return (xp.matmul(a2, b2) * scale).reshape(tuple(kernel_shape))


# ---------------------------------------------------------------------- surgery
def projection_paths(model: nnx.Module) -> list[str]:
    """'layers/0/attn/q', ... : every projection LoRA could adapt, in graph order."""
    return ["/".join(map(str, path)) for path, module in nnx.iter_graph(model) if isinstance(module, Dense) and path]


def _wanted(entry: str) -> tuple[str, bool]:
    """(pattern, is_name): a plain identifier names projections; anything else is a regex over paths."""
    entry = PEFT_ALIASES.get(entry, entry)
    return entry, re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", entry) is not None


def _matches(path: str, entry: str) -> bool:
    if entry == ALL_LINEAR:
        return True
    pattern, is_name = _wanted(entry)
    return path.rsplit("/", 1)[-1] == pattern if is_name else re.search(pattern, path) is not None


def summarize_paths(paths: Sequence[str], limit: int = 40) -> str:
    """Paths with layer indices folded ('layers/*/attn/q'), for error messages on big models."""
    folded = list(dict.fromkeys(re.sub(r"(^|/)\d+(?=/|$)", r"\1*", p) for p in paths))
    shown = ", ".join(folded[:limit]) + (f", ... ({len(folded)} patterns)" if len(folded) > limit else "")
    return shown


def select_projections(paths: Sequence[str], targets: Iterable[str]) -> list[str]:
    """The projection paths `targets` select; an entry that selects nothing is an error."""
    targets = tuple(targets)
    unmatched = [t for t in targets if not any(_matches(p, t) for p in paths)]
    if unmatched:
        names = sorted({p.rsplit("/", 1)[-1] for p in paths})
        raise LoRAError(
            f"config.lora.targets {unmatched} match no projection of this model. Targets are projection "
            f"names {names} (or PEFT's {sorted(PEFT_ALIASES)}, '{ALL_LINEAR}'), or regular expressions "
            f"searched in these projection paths: {summarize_paths(paths)}"
        )
    return [p for p in paths if any(_matches(p, t) for t in targets)]


def compact_targets(paths: Sequence[str], chosen: Sequence[str]) -> tuple[str, ...]:
    """`targets` that select exactly `chosen` among `paths`: projection names when every layer's
    projection of those names is chosen, else one anchored regex per chosen path."""
    names = sorted({p.rsplit("/", 1)[-1] for p in chosen})
    if set(select_projections(paths, names)) == set(chosen):
        return tuple(names)
    return tuple(f"^{re.escape(p)}$" for p in chosen)


def stack_size(module: Dense) -> int:
    """The number of stacked layers a projection's kernel holds (1 for an unstacked one)."""
    axes = tuple(module.kernel.get_metadata().get("logical_axes") or ())
    return math.prod(module.kernel.shape[:stacked_dims(axes)])


def _per_layer(path: str, module: Dense) -> list[str]:
    """A projection's names in the unrolled layout ('layers/attn/q' of a 3-layer stack ->
    'layers/0/attn/q', ..., 'layers/2/attn/q'); itself when it is not stacked."""
    return layout.layer_names(path, stack_size(module)) or [path]


def apply(model: nnx.Module, config: LoRAConfig, *, rngs: nnx.Rngs) -> nnx.Module:
    """Replaces the targeted projections of `model` with `LoRADense` (in place); returns `model`.

    Targets mean the same in both layer layouts: they are matched against the unrolled names
    ('layers/0/attn/q'), and a stacked projection is adapted when all its layers are targeted (a
    target naming only some layers of a stack is a `layout.PartialStackError`).
    """
    projections = {"/".join(map(str, p)): m for p, m in nnx.iter_graph(model) if isinstance(m, Dense) and p}
    views = {path: _per_layer(path, module) for path, module in projections.items()}
    picked = set(select_projections([v for names in views.values() for v in names], config.targets))
    chosen = {
        path for path, module in projections.items()
        if layout.layerwise(path, stack_size(module), picked.__contains__, f"config.lora.targets={list(config.targets)}")
    }
    found = [(path, module) for path, module in nnx.iter_graph(model) if "/".join(map(str, path)) in chosen]
    for path, module in found:
        parent = model
        for key in path[:-1]:
            parent = parent[key] if isinstance(key, int) else getattr(parent, key)
        adapted = LoRADense(module, config, rngs=rngs, name="/".join(map(str, path)))
        if isinstance(path[-1], int):
            parent[path[-1]] = adapted
        else:
            setattr(parent, path[-1], adapted)
    return model


def adapters(model: nnx.Module) -> list[tuple[str, LoRADense]]:
    """('layers/0/attn/q', module) for every adapted projection."""
    return [("/".join(map(str, p)), m) for p, m in nnx.iter_graph(model) if isinstance(m, LoRADense)]


def train_mode(model: nnx.Module, rng: jax.Array) -> nnx.Module:
    """Switches adapter dropout on for one training step, each adapter with its own key (in place).

    `rng` is the step's (and micro-batch's) key; stacked adapters get one key per layer.
    """
    for index, (_, module) in enumerate(adapters(model)):
        if not module.dropout_rate:
            continue
        module.deterministic = False
        stack = module.dropout_key.shape[:-1]
        key = jax.random.fold_in(rng if _is_typed_key(rng) else jax.random.wrap_key_data(rng), index)
        keys = jax.random.split(key, stack) if stack else key
        # A new Variable, not an in-place update: the merged model shares the step's constant
        # Variables, which belong to an outer trace.
        module.dropout_key = DropoutKey(jax.random.key_data(keys))
    return model


def adapters_off(model: nnx.Module) -> nnx.Module:
    """A view of `model` that computes its base alone: every adapter switched off.

    The view holds the same parameter arrays (nothing is copied) and `model` is left as it is, so
    a LoRA run's policy and its reference (the base: the initial policy while B = 0) share one
    copy of the weights. Raises when `model` has no adapters.
    """
    graphdef, state = nnx.split(model)
    view = nnx.merge(graphdef, state)
    found = adapters(view)
    if not found:
        raise LoRAError("adapters_off: the model has no LoRA adapters (config.lora.rank is 0)")
    for _, module in found:
        module.enabled = False
    return view


def _is_typed_key(x: jax.Array) -> bool:
    return jnp.issubdtype(x.dtype, jax.dtypes.prng_key)


def is_adapter_path(path: Sequence[Any]) -> bool:
    """Whether a parameter path ('layers/0/attn/q/lora_a' or its key tuple) is a LoRA adapter."""
    last = path.rsplit("/", 1)[-1] if isinstance(path, str) else str(path[-1])
    return last in ADAPTER_NAMES


def merged_params(params: Any, scales: dict[str, float], dtype: str | None = None) -> dict:
    """A plain model's parameters (nested pure dict): every kernel + scale * A B, adapters removed.

    `params` is the adapted model's pure dict (host or device arrays); `scales` maps each adapted
    projection path ('layers/0/attn/q') to its scale (`scales_of(model)`). Computed in float32;
    `dtype` (default: the adapters' dtype) is what every merged array is cast to.
    """
    from flax.nnx import traversals

    flat = {k: np.asarray(v) for k, v in traversals.flatten_mapping(params).items()}
    out: dict[tuple, np.ndarray] = {}
    for key, value in flat.items():
        if str(key[-1]) in ADAPTER_NAMES:
            continue
        projection = "/".join(map(str, key[:-1]))
        if key[-1] == "kernel" and projection in scales:
            a, b = flat[(*key[:-1], "lora_a")], flat[(*key[:-1], "lora_b")]
            target = np.dtype(dtype) if dtype else a.dtype
            delta = merge_delta(a.astype(np.float32), b.astype(np.float32), scales[projection], value.shape)
            value = (value.astype(np.float32) + delta).astype(target)
        elif dtype:
            value = value.astype(np.dtype(dtype), copy=False)
        out[key] = value
    return traversals.unflatten_mapping(out)


def scales_of(model: nnx.Module, *, per_layer: bool = False) -> dict[str, float]:
    """{projection path: scale} of the adapted projections of `model`; `per_layer`: a stacked
    projection under each of its unrolled names (to go with `layout.unstack`ed parameters)."""
    if per_layer:
        return {name: module.scale for path, module in adapters(model) for name in _per_layer(path, module)}
    return {path: module.scale for path, module in adapters(model)}
