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

import dataclasses
import json
import logging
import os
import pathlib
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import numpy as np

from flan_jax.convert import checkpoint, diagnostics
from flan_jax.model import registry
from flan_jax.model.hf_config import UnsupportedConfigError

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
    return read_json(file)


def read_json(file: pathlib.Path) -> dict:
    """A JSON object from `file`; a parse error names the file, line and column."""
    try:
        value = json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ValueError(f"{file}: not valid JSON: {error.msg} at line {error.lineno} column {error.colno}") from None
    except UnicodeDecodeError as error:
        raise ValueError(f"{file}: not UTF-8 text ({error})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{file}: expected a JSON object, got {type(value).__name__}")
    return value


def tensor_names(hf_dir: str | os.PathLike) -> set[str]:
    """The tensor names stored in the folder's safetensors files (headers only, no data read)."""
    from safetensors import SafetensorError, safe_open

    names: set[str] = set()
    for file in safetensors_files(pathlib.Path(hf_dir)):
        try:
            with safe_open(os.fspath(file), framework="numpy") as f:
                names.update(f.keys())
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: cannot read it as safetensors ({error}); is the file truncated "
                             "or corrupt? Download it again.") from None
    return names


def model_config_from(hf_config: dict, source: str | os.PathLike, names: Iterable[str] = ()) -> ModelConfig:
    """The model config of an HF config.json dict: its family by `model_type` (model.registry), which
    refuses what it cannot reproduce by name; any refusal or bad value is reported against `source`.
    `names` are the checkpoint's tensor names (a family may read settings from them, e.g. T5's tied head)."""
    try:
        family = registry.hf_family(hf_config.get("model_type"))
        return family.hf.config_from_hf(hf_config, set(names))
    except UnsupportedConfigError as error:  # its messages say "config.json <field> ..."
        raise UnsupportedConfigError(f"{source}: {str(error).removeprefix('config.json ')}") from None
    except (ValueError, TypeError, KeyError) as error:
        raise ValueError(f"{source}: cannot build a model from it: {error}") from None


def config_from_hf_dir(hf_dir: str | os.PathLike) -> ModelConfig:
    """The model config of a Hugging Face folder, refused by name before anything is written."""
    hf_dir = pathlib.Path(hf_dir)
    return model_config_from(read_hf_config(hf_dir), hf_dir / "config.json", tensor_names(hf_dir))


@dataclasses.dataclass(frozen=True)
class SourceTensor:
    """One tensor of a source checkpoint, read only when `load()` is called."""

    key: str  # the HF name its rule knows it by (the family's tensor_rules)
    shape: tuple[int, ...]
    where: str  # for messages: the file, and the name it is stored under when that differs
    load: Callable[[], np.ndarray]


def safetensors_tensors(hf_dir: pathlib.Path, cfg: ModelConfig) -> Iterator[SourceTensor]:
    """The tensors of an HF folder's safetensors files, one file open at a time."""
    from safetensors import SafetensorError, safe_open

    interop = registry.get_family(cfg.family).hf
    for file in safetensors_files(hf_dir):
        try:
            handle = safe_open(os.fspath(file), framework="numpy")
        except (SafetensorError, OSError) as error:
            raise ValueError(f"{file}: cannot read it as safetensors ({error}); is the file truncated "
                             "or corrupt? Download it again.") from None
        with handle as f:
            for raw_key in f.keys():
                key = interop.canonical_key(cfg, raw_key)

                def load(f=f, raw_key=raw_key, file=file):
                    try:
                        return f.get_tensor(raw_key)
                    except (SafetensorError, OSError, ValueError) as error:
                        raise ValueError(f"{file}: cannot read tensor {raw_key!r} ({error})") from None

                where = f"{file}" + (f" (stored as {raw_key!r})" if raw_key != key else "")
                yield SourceTensor(key, tuple(f.get_slice(raw_key).get_shape()), where, load)


def convert_tensors(
    tensors: Iterable[SourceTensor], cfg: ModelConfig, *, source: str, config_name: str = "config.json",
    field_names: dict[str, str] | None = None,
) -> Iterator[tuple[tuple, np.ndarray]]:
    """Yields (our param path, array) as soon as each is converted; raises at the end if any
    source tensor was unexpected or missing (nothing is dropped silently).

    Every error names the source (`source`, the tensor's file) and tensor; a shape that does not
    fit names the config fields that imply the expected one (diagnostics.shape_mismatch).
    """
    interop = registry.get_family(cfg.family).hf
    rules = interop.tensor_rules(cfg)
    rule_of = {key: rule for rule in rules for key in rule.hf_keys}
    expected = {p: tuple(s.shape) for p, s in checkpoint.abstract_params(cfg).items()}
    axes = checkpoint.abstract_axes(cfg)
    pending: dict[int, dict[str, np.ndarray]] = {}
    done: set[tuple] = set()
    unexpected: list[str] = []
    skipped: list[str] = []
    for tensor in tensors:
        rule = rule_of.get(tensor.key)
        if rule is None:
            if interop.skip_tensor(cfg, tensor.key):
                skipped.append(tensor.key)
            else:
                unexpected.append(f"{tensor.key} (in {tensor.where})")
            continue
        want = diagnostics.expected_source_shapes(rule, [expected[p] for p in rule.paths])
        if tensor.shape != want[rule.hf_keys.index(tensor.key)]:  # checked before reading it
            raise diagnostics.shape_mismatch(
                where=tensor.where, key=tensor.key, got=tensor.shape, rule=rule, cfg=cfg, expected=expected,
                axes=axes, config_name=config_name, field_names=field_names)
        got = pending.setdefault(id(rule), {})
        got[tensor.key] = tensor.load()
        if len(got) < len(rule.hf_keys):
            continue
        del pending[id(rule)]
        arrays = rule.to_ours([got.pop(k) for k in rule.hf_keys])
        for path, array in zip(rule.paths, arrays):
            done.add(path)
            yield path, array
        del arrays
    if unexpected:
        raise ValueError(f"{source}: tensors this {cfg.family} model has no place for: {unexpected[:10]}")
    missing = [key for rule in rules for key in rule.hf_keys if any(p not in done for p in rule.paths)]
    if missing:
        raise ValueError(f"{source}: tensors missing: {missing[:10]}")
    if skipped:
        logging.info("Skipped %d buffers / duplicate tied weights: %s", len(skipped), skipped[:5])


def iter_hf_params(hf_dir: str | os.PathLike, cfg: ModelConfig) -> Iterator[tuple[tuple, np.ndarray]]:
    """(our param path, array) of an HF folder's safetensors, converted tensor by tensor."""
    hf_dir = pathlib.Path(hf_dir)
    yield from convert_tensors(safetensors_tensors(hf_dir, cfg), cfg, source=str(hf_dir),
                               config_name=str(hf_dir / "config.json"))


def load_hf_params(hf_dir: str | os.PathLike, cfg: ModelConfig | None = None) -> tuple[ModelConfig, dict[tuple, np.ndarray]]:
    """(ModelConfig, flat {path: array}) read from an HF folder, all in memory (tests, small models)."""
    cfg = cfg or config_from_hf_dir(hf_dir)
    return cfg, dict(iter_hf_params(hf_dir, cfg))


def convert_from_hf(hf_dir: str | os.PathLike, out_dir: str | os.PathLike) -> ModelConfig:
    """`python -m flan_jax.convert --from_hf=HF_DIR --out=OUT_DIR`, streaming layer by layer.

    Everything is checked that can be before anything is written (config, weight files, the
    output folder); the checkpoint is written into a temporary folder renamed to OUT_DIR at the
    end (checkpoint.staged_folder), so a failure leaves no partial checkpoint behind.
    """
    hf_dir, out_dir = pathlib.Path(hf_dir), pathlib.Path(out_dir)
    ggufs = sorted(hf_dir.glob("*.gguf")) if hf_dir.is_dir() else []
    if ggufs and not any(hf_dir.glob("*.safetensors")):  # a GGUF download (e.g. from a Hub repo)
        if len(ggufs) > 1:
            raise ValueError(f"{hf_dir} holds several GGUF files {[f.name for f in ggufs]}; "
                             "choose one with --from_gguf=FILE")
        from flan_jax.convert import gguf_import

        return gguf_import.convert_from_gguf(ggufs[0], out_dir)
    safetensors_files(hf_dir)  # refuse pickle-only folders first, before reading anything
    hf_config = read_hf_config(hf_dir)
    cfg = config_from_hf_dir(hf_dir)
    with checkpoint.staged_folder(out_dir) as staging:
        count = write_converted(staging, cfg, iter_hf_params(hf_dir, cfg), hf_config)
        copied = checkpoint.copy_tokenizer_files(hf_dir, staging)
    logging.info("Converted %s (%s, %d tensors) to %s; tokenizer files: %s", hf_dir, cfg.family, count, out_dir, copied)
    return cfg


def write_converted(staging: pathlib.Path, cfg: ModelConfig, params: Iterable[tuple[tuple, np.ndarray]],
                    hf_config: dict) -> int:
    """Streams `params` into a converted checkpoint in `staging`; returns how many were written."""
    count = 0
    with checkpoint.StreamingWriter(staging, cfg) as writer:
        for path, array in params:
            writer.add(path, array)
            count += 1
        writer.close()
    (staging / checkpoint.HF_CONFIG).write_text(json.dumps(hf_config, indent=2) + "\n")
    checkpoint.write_config_overrides(staging, cfg)
    return count
