"""Which parameters a run trains: the trainable-parameter filter (`config.trainable`, `config.lora`).

Gradients, optimizer state and weight decay cover only the selected parameters (the train state's
`params`); the others form the frozen slot "base" (train/state.py): sharded by the same logical
rules, optionally held in a smaller dtype (`frozen_dtype`, e.g. bf16 while adapters train in
float32), never written into the run's checkpoints but rebuilt at start from `checkpoint.init_from`
(or the seed) and checked by fingerprint on resume.

    config.trainable.paths = (r"attn/(q|k|v|o)/",)     # only the attention projections
    config.trainable.exclude = (r"^embed", r"^lm_head")  # everything but the embeddings and head
    config.trainable.logical_axes = ("heads",)           # parameters with a `heads` dimension
    config.lora.rank = 16                                # LoRA: only the adapters (+ new heads)

Paths are the parameters' slash-joined key paths ("layers/0/attn/q/kernel"), searched with
`re.search`; logical axes are the names in the parameters' `logical_axes` metadata. With no
`paths` / `logical_axes`, every parameter is trained, or with LoRA the adapters and the scalar
heads an objective adds (a reward model's `score` starts untrained); with them, LoRA's adapters
are trained in addition to what they select (e.g. `paths=("norm",)` also trains the norms). A
pattern or name that selects nothing is an error listing what it could have matched.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax.nnx import traversals

from flan_jax.model import layout, lora as lora_lib

FROZEN_DTYPES = ("", "float32", "bfloat16", "float16")
_NEW_HEADS = r"^scalar_heads/"  # heads an objective adds on top of a pretrained model (train/objectives)

Path = tuple  # a flat key path of the params pure dict, e.g. ("layers", 0, "attn", "q", "kernel")


def path_str(path: Sequence[Any]) -> str:
    return "/".join(map(str, path))


@dataclasses.dataclass(frozen=True)
class Spec:
    """What `config.trainable` (and `config.lora`) ask to train; `select` applies it to a model."""

    paths: tuple[str, ...] = ()
    logical_axes: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    frozen_dtype: str = ""
    lora: bool = False

    def __post_init__(self) -> None:
        if self.frozen_dtype not in FROZEN_DTYPES:
            raise ValueError(f"config.trainable.frozen_dtype={self.frozen_dtype!r}: expected one of {FROZEN_DTYPES}")
        for field in ("paths", "exclude"):
            for pattern in getattr(self, field):
                try:
                    re.compile(pattern)
                except re.error as error:
                    raise ValueError(f"config.trainable.{field}: {pattern!r} is not a regular expression ({error})") from None

    @property
    def trains_everything(self) -> bool:
        return not (self.paths or self.logical_axes or self.exclude or self.lora)

    def select(self, abstract_params: Mapping, logical_axes: Mapping) -> Selection:
        """The Selection of this spec on a model's (abstract) parameters; see the module docstring."""
        flat = _flat(abstract_params)
        axes = traversals.flatten_mapping(logical_axes, is_leaf=lambda _, x: isinstance(x, tuple))
        names = {path: path_str(path) for path in flat}
        # Patterns are searched in the unrolled names ("layers/0/attn/q/kernel") in both layer
        # layouts; a stacked parameter is selected when all its layers are (layout.layerwise).
        views = {p: layout.layer_names(names[p], _stack_size(v)) or [names[p]] for p, v in flat.items()}

        def searched(field: str, p: Path) -> bool:
            patterns = getattr(self, field)
            return layout.layerwise(names[p], _stack_size(flat[p]), lambda n: _any_search(patterns, n),
                                    f"config.trainable.{field}={list(patterns)}")

        if self.paths or self.logical_axes:
            chosen = {p for p in flat if searched("paths", p)}
            chosen |= {p for p in flat if set(axes.get(p) or ()) & set(self.logical_axes)}
        elif self.lora:
            chosen = {p for p in flat if re.search(_NEW_HEADS, names[p])}
        else:
            chosen = set(flat)
        if self.lora:
            chosen |= {p for p in flat if lora_lib.is_adapter_path(p)}
        chosen -= {p for p in flat if searched("exclude", p)}
        self._check_each_matches(flat, {(p, n): n for p, ns in views.items() for n in ns}, axes)
        if not chosen:
            raise ValueError(
                "config.trainable selects no parameter to train (after `exclude`); parameters: "
                + lora_lib.summarize_paths(list(names.values()))
            )
        return Selection(paths=tuple(flat), trained=frozenset(chosen), frozen_dtype=self.frozen_dtype or None)

    def _check_each_matches(self, flat, names, axes) -> None:
        every = list(names.values())  # every parameter's unrolled name(s)
        for field in ("paths", "exclude"):
            for pattern in getattr(self, field):
                if not any(re.search(pattern, n) for n in every):
                    raise ValueError(
                        f"config.trainable.{field}: {pattern!r} matches no parameter. It is searched in these "
                        f"parameter paths: {lora_lib.summarize_paths(every)}"
                    )
        known = sorted({a for v in axes.values() for a in (v or ()) if a is not None})
        for name in self.logical_axes:
            if name not in known:
                raise ValueError(
                    f"config.trainable.logical_axes: no parameter has a dimension named {name!r}; "
                    f"the model's logical axis names are {known}"
                )


def _stack_size(leaf: Any) -> int:
    """The leading (layer) dimension of a parameter, for `layout.layer_names` of a stacked one."""
    shape = getattr(leaf, "shape", ())
    return int(shape[0]) if len(shape) else 0


def _any_search(patterns: Sequence[str], name: str) -> bool:
    return any(re.search(p, name) for p in patterns)


def spec_from_config(config: Any) -> Spec:
    """The Spec of an experiment config (its `trainable` and `lora` sections; absent = train all)."""
    section = config.get("trainable") if hasattr(config, "get") else None
    get = (lambda k, d: section.get(k, d)) if section is not None else (lambda k, d: d)  # noqa: E731
    return Spec(
        paths=tuple(get("paths", ())),
        logical_axes=tuple(get("logical_axes", ())),
        exclude=tuple(get("exclude", ())),
        frozen_dtype=str(get("frozen_dtype", "") or ""),
        lora=lora_lib.LoRAConfig.from_config(config.get("lora") if hasattr(config, "get") else None) is not None,
    )


@dataclasses.dataclass(frozen=True)
class Selection:
    """The parameters (flat key paths) a run trains; the rest is its frozen base."""

    paths: tuple[Path, ...]
    trained: frozenset[Path]
    frozen_dtype: str | None = None

    @property
    def everything(self) -> bool:
        return len(self.trained) == len(self.paths)

    def trained_part(self, tree: Mapping) -> dict:
        return self._part(tree, lambda p: p in self.trained)

    def frozen_part(self, tree: Mapping) -> dict:
        return self._part(tree, lambda p: p not in self.trained)

    @staticmethod
    def _part(tree: Mapping, keep: Callable[[Path], bool]) -> dict:
        return traversals.unflatten_mapping({p: v for p, v in _flat(tree).items() if keep(p)})

    def held(self, abstract_params: Mapping) -> dict:
        """`abstract_params` with the frozen ones in the dtype they are held in."""
        if not self.frozen_dtype:
            return dict(abstract_params)
        dtype = np.dtype(self.frozen_dtype)

        def hold(path, leaf):
            if _key_path(path) in self.trained or not np.issubdtype(leaf.dtype, np.floating):
                return leaf
            return jax.ShapeDtypeStruct(leaf.shape, dtype, sharding=getattr(leaf, "sharding", None))

        return jax.tree_util.tree_map_with_path(hold, dict(abstract_params))

    def summary(self, abstract_params: Mapping) -> str:
        """'trains 1,234 of 56,789 parameters (2.2%): layers/*/attn/q/lora_a, ...; frozen: ...'."""
        flat = _flat(abstract_params)
        trained = sum(int(np.prod(v.shape)) for p, v in flat.items() if p in self.trained)
        total = sum(int(np.prod(v.shape)) for v in flat.values())
        names = [path_str(p) for p in flat if p in self.trained]
        held = f"; frozen base held in {self.frozen_dtype}" if self.frozen_dtype else ""
        return (
            f"trains {trained:,} of {total:,} parameters ({100.0 * trained / max(total, 1):.2f}%): "
            f"{lora_lib.summarize_paths(names, limit=12)}{held}"
        )


def _flat(tree: Mapping) -> dict[Path, Any]:
    return traversals.flatten_mapping(tree, is_leaf=lambda _, x: not isinstance(x, Mapping))


def only(tree: Mapping, paths: frozenset[Path] | set[Path]) -> dict:
    """The nested subset of `tree` at the given flat key paths."""
    return traversals.unflatten_mapping({p: v for p, v in _flat(tree).items() if p in paths})


def without(tree: Mapping, paths: frozenset[Path] | set[Path]) -> dict:
    """`tree` less the given flat key paths."""
    return traversals.unflatten_mapping({p: v for p, v in _flat(tree).items() if p not in paths})


def join(*trees: Mapping) -> dict:
    """Disjoint nested parameter subsets joined into one tree (a path in two of them is an error)."""
    out: dict[Path, Any] = {}
    for tree in trees:
        flat = _flat(tree)
        both = set(flat) & set(out)
        if both:
            raise ValueError(f"join: parameters given twice: {sorted(path_str(p) for p in both)[:5]}")
        out.update(flat)
    return traversals.unflatten_mapping(out)


def adapter_paths(tree: Mapping) -> frozenset[Path]:
    """The flat key paths of the LoRA adapters in a parameter tree."""
    return frozenset(p for p in _flat(tree) if lora_lib.is_adapter_path(p))


def _key_path(path) -> Path:
    """A jax key path of a pure dict -> the flat key tuple Selection stores."""
    return tuple(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))) for k in path)


def is_trained(selection: Selection | None, path: Sequence[Any]) -> bool:
    """Whether the parameter at `path` (key tuple) is trained (no selection: everything is)."""
    return selection is None or tuple(path) in selection.trained


def selection_of(config: Any, model: Any) -> Selection:
    """The Selection a run's config (`config.trainable`, `config.lora`) makes on its model, e.g. to
    show which parameters a checkpoint's run trained (colabs/explore_checkpoint.ipynb)."""
    from flax import nnx

    from flan_jax.train import partitioning

    state = nnx.state(model, nnx.Param)
    return spec_from_config(config).select(nnx.to_pure_dict(state), partitioning.param_logical_axes(state))
