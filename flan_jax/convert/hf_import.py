"""Hugging Face folder (config.json + *.safetensors) -> converted checkpoint, tensor by tensor.

Memory: each safetensors file is memory-mapped and read one tensor at a time; each tensor is
converted (transpose / reshape, in its own dtype) as soon as every HF tensor its rule needs has
been read, and each layer is written (checkpoint.StreamingWriter) as soon as it is complete, so
the host holds about one layer plus the tensors of layers split across shards, never the model.
A 7B bf16 checkpoint (~13.5 GB) thus converts on a 24 GiB host (benchmarks/convert_memory.py).

Only safetensors are read. PyTorch pickle files (.bin / .pt / .pth) can run arbitrary code when
loaded, so they are refused with instructions rather than unpickled.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Iterator
from typing import Any

import numpy as np

from flan_jax.convert import checkpoint
from flan_jax.model import registry

ModelConfig = Any  # any family's model config (model.registry)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


class RefusedCheckpointError(ValueError):
    """The folder holds only PyTorch pickle weights, which are never loaded."""


def safetensors_files(hf_dir: pathlib.Path) -> list[pathlib.Path]:
    """The weight files of `hf_dir`: from the shard index when there is one, else every *.safetensors."""
    index = hf_dir / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map")
        if not weight_map:
            raise ValueError(f"{index} has no 'weight_map'")
        files = [hf_dir / name for name in sorted(set(weight_map.values()))]
        absent = [str(f) for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} lists shards that are missing: {absent}")
        return files
    if (hf_dir / "model.safetensors").is_file():
        # Some repos also ship the original weights (e.g. Mistral's consolidated.safetensors).
        return [hf_dir / "model.safetensors"]
    files = sorted(hf_dir.glob("*.safetensors"))
    if files:
        return files
    pickles = sorted(p.name for p in hf_dir.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles:
        raise RefusedCheckpointError(
            f"{hf_dir} holds only PyTorch pickle weights {pickles}; flan_jax reads safetensors only "
            "(unpickling can run arbitrary code). Convert once, in an environment you trust:\n"
            "  from transformers import AutoModelForCausalLM\n"
            f"  AutoModelForCausalLM.from_pretrained('{hf_dir}').save_pretrained('OUT', safe_serialization=True)\n"
            "then copy the tokenizer files along and convert OUT."
        )
    raise FileNotFoundError(f"{hf_dir} has no *.safetensors weights")


def read_hf_config(hf_dir: pathlib.Path) -> dict:
    file = hf_dir / "config.json"
    if not file.is_file():
        raise FileNotFoundError(f"{file} not found: --from_hf expects a Hugging Face model folder")
    return json.loads(file.read_text())


def tensor_names(hf_dir: str | os.PathLike) -> set[str]:
    """The tensor names stored in the folder's safetensors files (headers only, no data read)."""
    from safetensors import safe_open

    names: set[str] = set()
    for file in safetensors_files(pathlib.Path(hf_dir)):
        with safe_open(os.fspath(file), framework="numpy") as f:
            names.update(f.keys())
    return names


def config_from_hf_dir(hf_dir: str | os.PathLike) -> ModelConfig:
    """The model config of a Hugging Face folder: its family by config.json's model_type, refusing
    what that family cannot reproduce by name (before anything is written)."""
    hf_dir = pathlib.Path(hf_dir)
    hf_config = read_hf_config(hf_dir)
    family = registry.hf_family(hf_config.get("model_type"))
    return family.hf.config_from_hf(hf_config, tensor_names(hf_dir))


def iter_hf_params(hf_dir: str | os.PathLike, cfg: ModelConfig) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (our param path, array) as soon as each is converted; raises at the end if any
    HF tensor was unexpected or missing (nothing is dropped silently)."""
    from safetensors import safe_open

    hf_dir = pathlib.Path(hf_dir)
    interop = registry.get_family(cfg.family).hf
    rules = interop.tensor_rules(cfg)
    rule_of = {key: rule for rule in rules for key in rule.hf_keys}
    expected = checkpoint.abstract_params(cfg)
    pending: dict[int, dict[str, np.ndarray]] = {}
    done: set[tuple] = set()
    unexpected: list[str] = []
    skipped: list[str] = []
    for file in safetensors_files(hf_dir):
        with safe_open(os.fspath(file), framework="numpy") as f:
            for raw_key in f.keys():
                key = interop.canonical_key(cfg, raw_key)
                rule = rule_of.get(key)
                if rule is None:
                    if interop.skip_tensor(cfg, key):
                        skipped.append(raw_key)
                    else:
                        unexpected.append(f"{raw_key} (in {file.name})")
                    continue
                got = pending.setdefault(id(rule), {})
                got[key] = f.get_tensor(raw_key)
                if len(got) < len(rule.hf_keys):
                    continue
                del pending[id(rule)]
                arrays = rule.to_ours([got.pop(k) for k in rule.hf_keys])
                for path, array in zip(rule.paths, arrays):
                    want = tuple(expected[path].shape)
                    if array.shape != want:
                        raise ValueError(
                            f"{file}: tensor {raw_key} gives {'/'.join(map(str, path))} shape {array.shape}, "
                            f"but config.json implies {want}"
                        )
                    done.add(path)
                    yield path, array
                del arrays
    if unexpected:
        raise ValueError(f"{hf_dir}: tensors this {cfg.family} model has no place for: {unexpected[:10]}")
    missing = [key for rule in rules for key in rule.hf_keys if any(p not in done for p in rule.paths)]
    if missing:
        raise ValueError(f"{hf_dir}: tensors missing from the safetensors files: {missing[:10]}")
    if skipped:
        logging.info("Skipped %d buffers / duplicate tied weights: %s", len(skipped), skipped[:5])


def load_hf_params(hf_dir: str | os.PathLike, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict[tuple, np.ndarray]]:
    """(ModelConfig, flat {path: array}) read from an HF folder, all in memory (tests, small models)."""
    cfg = cfg or config_from_hf_dir(hf_dir)
    return cfg, dict(iter_hf_params(hf_dir, cfg))


def convert_from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> ModelConfig:
    """`python -m flan_jax.convert --from_hf=HF_DIR --out=OUT_DIR`, streaming layer by layer."""
    hf_dir, out_dir = pathlib.Path(hf_dir), pathlib.Path(out_dir)
    hf_config = read_hf_config(hf_dir)
    safetensors_files(hf_dir)  # refuse pickle-only folders first, before creating anything
    cfg = config_from_hf_dir(hf_dir)
    writer = checkpoint.StreamingWriter(out_dir, cfg)
    count = 0
    for path, array in iter_hf_params(hf_dir, cfg):
        writer.add(path, array)
        count += 1
    writer.close()
    (out_dir / checkpoint.HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    copied = checkpoint.copy_tokenizer_files(hf_dir, out_dir)
    logging.info("Converted %s (%s, %d tensors) to %s; tokenizer files: %s", hf_dir, cfg.family, count, out_dir, copied)
    return cfg
