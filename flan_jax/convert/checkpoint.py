"""The converted-checkpoint folder that `checkpoint.init_from` starts from.

    OUT_DIR/model_config.json      our ModelConfig (architecture + runtime fields)
    OUT_DIR/params/                Orbax checkpoint of the params pure dict (nnx.state(model, nnx.Param))
    OUT_DIR/hf_config.json         the source config.json, kept for reference (token ids, ...)
    OUT_DIR/tokenizer.model|tokenizer.json|tokenizer_config.json|...   copied along

Arrays are stored in the source checkpoint's dtype (a bf16 checkpoint stays bf16: half the disk
and half the host memory while converting); `load_converted(dtype=...)` casts when asked.
"""

from __future__ import annotations

import json
import os
import pathlib
import shutil
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np
from flax import nnx

from flan_jax.model.config import ModelConfig

MODEL_CONFIG = "model_config.json"
PARAMS = "params"
HF_CONFIG = "hf_config.json"
TOKENIZER_FILES = (
    "tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
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
    """Flat {path: ShapeDtypeStruct} of the model `cfg` describes, built without allocating it."""
    from flan_jax.model.transformer import Transformer

    model = nnx.eval_shape(lambda: Transformer(cfg, rngs=nnx.Rngs(0)))
    return flatten(nnx.to_pure_dict(nnx.state(model, nnx.Param)))


def save_converted(out_dir: str | os.PathLike, cfg: ModelConfig, params: Mapping[tuple, np.ndarray]) -> None:
    """Writes model_config.json and the Orbax params of a converted checkpoint."""
    import orbax.checkpoint as ocp

    out = pathlib.Path(out_dir).absolute()
    if (out / PARAMS).exists():
        raise FileExistsError(f"{out / PARAMS} already exists; choose an empty --out folder")
    out.mkdir(parents=True, exist_ok=True)
    tree = nest({tuple(str(k) for k in path): value for path, value in params.items()})
    with ocp.StandardCheckpointer() as checkpointer:
        checkpointer.save(out / PARAMS, tree)
    (out / MODEL_CONFIG).write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")


def read_model_config(path: str | os.PathLike) -> ModelConfig:
    file = pathlib.Path(path) / MODEL_CONFIG
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: is {path} a folder written by `python -m flan_jax.convert --from_hf`?")
    return ModelConfig.from_dict(json.loads(file.read_text()))


def load_converted(path: str | os.PathLike, *, dtype: str | None = None) -> tuple[ModelConfig, nnx.State]:
    """(ModelConfig, params) of a converted checkpoint; params as an nnx.State of host numpy arrays.

    `dtype` (e.g. "float32") casts every array; None keeps the stored dtype. The arrays stay on
    the host so the caller (the trainer) places them into its own shardings.
    """
    import orbax.checkpoint as ocp

    path = pathlib.Path(path).absolute()
    cfg = read_model_config(path)
    expected = abstract_params(cfg)
    with ocp.StandardCheckpointer() as checkpointer:
        metadata = checkpointer.metadata(path / PARAMS)
        stored = flatten(metadata.item_metadata.tree if hasattr(metadata, "item_metadata") else metadata)
        _check_same_params(path, expected, {p: m.shape for p, m in stored.items()})
        target = nest({
            tuple(str(k) for k in p): jax.ShapeDtypeStruct(tuple(m.shape), np.dtype(dtype) if dtype else m.dtype)
            for p, m in stored.items()
        })
        restored = checkpointer.restore(path / PARAMS, target)
    flat = {p: np.asarray(v) for p, v in flatten(restored).items()}
    state = nnx.state(nnx.eval_shape(lambda: _model(cfg)), nnx.Param)
    nnx.replace_by_pure_dict(state, nest(flat))
    return cfg, state


def _model(cfg: ModelConfig):
    from flan_jax.model.transformer import Transformer

    return Transformer(cfg, rngs=nnx.Rngs(0))


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
