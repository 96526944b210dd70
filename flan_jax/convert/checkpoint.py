"""The converted-checkpoint folder that `checkpoint.init_from` starts from.

    OUT_DIR/model_config.json      the family's model config (ModelConfig, T5Config: architecture +
                                   runtime fields, its `family` names the family); written last
    OUT_DIR/params/groups.json     the parameter groups below, in order
    OUT_DIR/params/<group>/        one Orbax (StandardCheckpointer) checkpoint per group: the pure-dict
                                   subtree of nnx.state(model, nnx.Param) for "embed", "layers.0", ...,
                                   "final_norm", "lm_head"
    OUT_DIR/hf_config.json         the source config.json, kept for reference (token ids, ...)
    OUT_DIR/tokenizer.model|tokenizer.json|tokenizer_config.json|...   copied along

Why one Orbax checkpoint per group rather than one for the whole tree: Orbax's save keeps its own
copy of every array it writes, so saving the whole tree at once needs twice the model in host
memory (27 GB for a 7B bf16 model, over a 24 GiB host). Saving each layer as soon as its tensors
are converted keeps the converter's memory near one layer plus the runtime
(benchmarks/convert_memory.py measures it).

Arrays are stored in the source checkpoint's dtype (a bf16 checkpoint stays bf16: half the disk);
`load_converted(dtype=...)` casts when asked.

Layers are always stored one group per layer (the unrolled layout, so a layer can be written as
soon as it is converted); `save_converted` takes either layout and `load_converted` returns the
layout its config asks for (`stacked=` overrides it), see `flan_jax.model.layout`.

A conversion writes into a hidden sibling folder (`.OUT_DIR.partial-*`) and renames it to OUT_DIR
only once everything is written (`staged_folder`), so a failed or killed conversion never leaves
a folder that looks like a checkpoint, and the retry does not find "an existing checkpoint".
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import secrets
from collections.abc import Iterator, Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from flan_jax.model import layout, registry

ModelConfig = Any  # any family's model config (model.registry)

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
HF_CONFIG = "hf_config.json"
OVERRIDES = "config_overrides.py.txt"
TOKENIZER_FILES = (
    "tokenizer.model", "spiece.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "generation_config.json", "vocab.json", "merges.txt",
)


def nest(flat: Mapping[tuple, Any]) -> dict:
    """{("layers", 0, "attn"): x} -> {"layers": {0: {"attn": x}}}."""
    tree: dict = {}
    for path, value in flat.items():
        node = tree
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return tree


def flatten(tree: Mapping) -> dict[tuple, Any]:
    """Inverse of `nest`; accepts an nnx.State or an already flat dict. "0"-like keys become ints."""
    if isinstance(tree, nnx.State):
        tree = nnx.to_pure_dict(tree)
    if tree and all(isinstance(k, tuple) for k in tree):
        return dict(tree)  # already flat
    out: dict[tuple, Any] = {}

    def walk(node, prefix):
        if isinstance(node, Mapping):
            for key, child in node.items():
                walk(child, (*prefix, int(key) if isinstance(key, str) and key.isdigit() else key))
        else:
            out[prefix] = node

    walk(tree, ())
    return out


def abstract_params(cfg: ModelConfig) -> dict[tuple, jax.ShapeDtypeStruct]:
    """Flat {path: ShapeDtypeStruct} of the model `cfg` describes, in the unrolled layout (how
    converted checkpoints and HF folders hold layers), built without allocating it."""
    model = nnx.eval_shape(lambda: _model(cfg))
    return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def unrolled_flat(params: Mapping | nnx.State) -> dict[tuple, Any]:
    """Flat {path: array} of `params` (flat, nested or nnx.State; either layer layout), per layer."""
    flat = flatten(params)
    if layout.is_stacked(nest(flat)):  # the decoder's `layers`, T5's `encoder/layers` and `decoder/layers`
        flat = flatten(layout.unstack(nest(flat)))
    return flat


def abstract_axes(cfg: ModelConfig) -> dict[tuple, tuple[str, ...]]:
    """Flat {path: logical axis names} of the model `cfg` describes, unrolled (for error messages)."""
    model = nnx.eval_shape(lambda: _model(cfg))
    return {tuple(path): tuple(variable.get_metadata().get("logical_axes") or ())
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def group_of(path: tuple) -> str:
    """The checkpoint group of a parameter path: one per layer ("layers.3"; T5's "encoder.layers.3"),
    one per other top-level entry ("embed", "final_norm", T5's "encoder" for its table and norm)."""
    for depth, key in enumerate(path[:-1]):
        if key == "layers":
            return ".".join(str(k) for k in path[: depth + 2])
    return str(path[0])


class StreamingWriter:
    """Saves parameters group by group as they arrive, so the whole model is never held at once.

        writer = StreamingWriter(out_dir, cfg)
        for path, array in converted_params: writer.add(path, array)
        writer.close()      # checks completeness, then writes model_config.json
    """

    def __init__(self, out_dir: str | os.PathLike, cfg: ModelConfig):
        import orbax.checkpoint as ocp

        self.out = pathlib.Path(out_dir).absolute()
        if (self.out / PARAMS).exists() or (self.out / MODEL_CONFIG).exists():
            raise FileExistsError(f"{self.out} already holds a converted checkpoint; choose an empty --out folder")
        (self.out / PARAMS).mkdir(parents=True)
        self.cfg = cfg
        self.expected = abstract_params(cfg)
        self.groups = list(dict.fromkeys(group_of(p) for p in self.expected))
        self.waiting = {g: {p for p in self.expected if group_of(p) == g} for g in self.groups}
        self.pending: dict[str, dict[tuple, np.ndarray]] = {g: {} for g in self.groups}
        self.checkpointer = ocp.StandardCheckpointer()

    def __enter__(self) -> StreamingWriter:
        return self

    def __exit__(self, kind, error, traceback) -> None:
        if kind is not None:  # a failed conversion: stop Orbax's threads, write no model_config.json
            self.checkpointer.close()

    def add(self, path: tuple, array: np.ndarray) -> None:
        if path not in self.expected:
            raise KeyError(f"{'/'.join(map(str, path))} is not a parameter of this {self.cfg.family} model")
        want = tuple(self.expected[path].shape)
        if tuple(array.shape) != want:
            raise ValueError(f"{'/'.join(map(str, path))} has shape {tuple(array.shape)}, the model expects {want}")
        group = group_of(path)
        self.pending[group][path] = array
        self.waiting[group].discard(path)
        if not self.waiting[group]:
            tree = nest({tuple(str(k) for k in p): v for p, v in self.pending.pop(group).items()})
            self.checkpointer.save(self.out / PARAMS / group, tree)
            self.checkpointer.wait_until_finished()  # frees Orbax's copy before the next group

    def close(self) -> None:
        self.checkpointer.close()
        missing = sorted(str(p) for g in self.groups for p in self.waiting[g])
        if missing:
            raise ValueError(f"converted checkpoint {self.out} is missing parameters: {missing[:10]}")
        (self.out / PARAMS / "groups.json").write_text(json.dumps(self.groups) + "\n")
        (self.out / MODEL_CONFIG).write_text(json.dumps(self.cfg.to_dict(), indent=2) + "\n")


@contextlib.contextmanager
def staged_folder(out_dir: str | os.PathLike, *, flag: str = "--out") -> Iterator[pathlib.Path]:
    """Yields an empty temporary sibling of `out_dir`, renamed to `out_dir` when the block succeeds.

    Refuses (before anything is written) an `out_dir` that exists and is not an empty folder. On any
    error, including KeyboardInterrupt, the temporary folder is deleted; a SIGKILL leaves only the
    hidden `.NAME.partial-*` folder, which nothing mistakes for a checkpoint.
    """
    out = pathlib.Path(out_dir).absolute()
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        what = "a converted checkpoint" if (out / MODEL_CONFIG).exists() or (out / PARAMS).exists() else "files"
        raise FileExistsError(f"{out} already holds {what}; choose a new or empty {flag} folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{secrets.token_hex(4)}"
    staging.mkdir()  # not tempfile.mkdtemp: its mode 0700 would become the checkpoint's
    try:
        yield staging
        if out.exists():
            out.rmdir()  # empty (checked above); rename cannot replace a folder on every platform
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def save_converted(out_dir: str | os.PathLike, cfg: ModelConfig, params: Mapping | nnx.State) -> None:
    """Writes a converted checkpoint of `params` (flat {path: array}, pure dict or nnx.State)."""
    with staged_folder(out_dir) as staging, StreamingWriter(staging, cfg) as writer:
        for path, value in unrolled_flat(params).items():
            writer.add(path, np.asarray(value))
        writer.close()


def config_model_overrides(cfg: ModelConfig) -> dict[str, Any]:
    """The `config.model` fields to set so an experiment config describes exactly `cfg`.

    `checkpoint.init_from` requires config.model to match the converted architecture; these are
    the fields whose default (for `cfg.family`) differs, runtime fields (dtypes, remat) excepted.
    """
    from flan_jax import default_config

    section = default_config.get_config().model
    section.family = cfg.family
    base = registry.config_from(section)
    return {"family": cfg.family, **{
        k: v for k, v in cfg.to_dict().items() if k not in cfg.RUNTIME_FIELDS and getattr(base, k) != v
    }}


def write_config_overrides(out_dir: pathlib.Path, cfg: ModelConfig) -> list[str]:
    """Writes (and returns) the experiment-config lines that train from the checkpoint in `out_dir`.

    The lines name the folder's final path: `out_dir` may be the staging folder of a conversion
    (`staged_folder`), whose final name is `out_dir`'s without the `.NAME.partial-*` disguise.
    """
    final = out_dir.parent / out_dir.name[1:].split(".partial-")[0] if ".partial-" in out_dir.name else out_dir
    lines = [f"config.checkpoint.init_from = {str(final)!r}"]
    lines += [f"config.model.{k} = {v!r}" for k, v in config_model_overrides(cfg).items()]
    (out_dir / OVERRIDES).write_text("\n".join(lines) + "\n")
    return lines


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    file = pathlib.Path(path) / MODEL_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a folder written by `python -m flan_jax.convert --from_hf`?")
    return registry.config_from_dict(json.loads(file.read_text()))


def load_converted(
    path: str | os.PathLike, *, dtype: str | None = None, stacked: bool | None = None
) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params) of a converted checkpoint; params as an nnx.State of host numpy arrays.

    `dtype` (e.g. "float32") casts every array; None keeps the stored dtype. The arrays stay on
    the host so the caller (the trainer) places them into its own shardings. `stacked` chooses
    the layer layout of the result (None: the config's, `cfg.scanned`); the returned config's
    `scan_layers` says which it is.
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    cfg = read_model_config(path)
    groups = json.loads((path / PARAMS / "groups.json").read_text())
    flat: dict[tuple, np.ndarray] = {}
    with ocp.StandardCheckpointer() as checkpointer:
        for group in groups:
            stored = checkpointer.metadata(path / PARAMS / group).item_metadata.tree
            target = jax.tree.map(
                lambda m: jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(dtype) if dtype else m.dtype), stored
            )
            flat.update({p: np.asarray(v) for p, v in flatten(checkpointer.restore(path / PARAMS / group, target)).items()})
    _check_same_params(path, abstract_params(cfg), {p: v.shape for p, v in flat.items()})
    stacked = cfg.scanned if stacked is None else stacked
    cfg = cfg.replace(scan_layers=stacked) if stacked != cfg.scanned else cfg
    if stacked:
        flat = layout.stack_flat(flat)
    state = nnx.state(nnx.eval_shape(lambda: registry.build_model(cfg, rngs=nnx.Rngs(0))), nnx.Param)  # cfg's layout
    nnx.replace_by_pure_dict(state, nest(flat))
    return cfg, state


def _model(cfg: ModelConfig):
    """The model `cfg` describes, in the unrolled layer layout (how converted checkpoints hold layers)."""
    return registry.build_model(cfg.unrolled(), rngs=nnx.Rngs(0))


def _check_same_params(where, expected: Mapping[tuple, Any], got: Mapping[tuple, tuple]) -> None:
    missing = sorted(set(expected) - set(got), key=str)
    unexpected = sorted(set(got) - set(expected), key=str)
    wrong = [(p, tuple(got[p]), tuple(expected[p].shape)) for p in expected if p in got and tuple(got[p]) != tuple(expected[p].shape)]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{where}: parameters do not match its model_config.json: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, wrong shapes (path, stored, expected) {wrong[:5]}"
        )


def copy_tokenizer_files(src: str | os.PathLike, dst: str | os.PathLike) -> list[str]:
    """Copies the tokenizer files present in `src` to `dst`; returns their names."""
    copied = []
    for name in TOKENIZER_FILES:
        if (pathlib.Path(src) / name).is_file():
            shutil.copy2(pathlib.Path(src) / name, pathlib.Path(dst) / name)
            copied.append(name)
    return copied
