"""GGUF file (llama.cpp) -> converted checkpoint: dequantised tensor by tensor, plus its tokenizer.

    python -m flan_jax.convert --from_gguf=model.gguf --out=OUT_DIR

A GGUF is read as if it were a Hugging Face folder: its metadata becomes the `config.json` that
transformers would write (`hf_config_from_gguf`), each tensor gets the HF name its rule in
mapping.py knows (through the `gguf` package's own name tables, the ones llama.cpp's converter
uses), is dequantised to float32 with the `gguf` package and has llama.cpp's conversion edits
undone (`_undo_llama_cpp`). From there on it is the HF import (hf_import.convert_tensors), so the
same shape checks, errors and layer-by-layer writing apply, and `--to_hf` of the result is an
ordinary HF folder.

What llama.cpp's convert_hf_to_gguf.py changes, and is undone here:
- Llama-architecture q/k projections have their rows permuted (`LlamaModel.permute`: rotate-half
  RoPE pairs -> interleaved pairs); the inverse permutation restores the HF layout.
- Gemma RMSNorm weights are stored as `w + 1` (llama.cpp's norm multiplies by the weight alone).
Qwen2/3 and Phi-3 (NeoX-style rope in llama.cpp) keep HF's layout; Phi-3's fused qkv and gate_up
projections stay fused, as in its HF checkpoints.

Refused by name before anything is written: a tensor type outside `SUPPORTED_TYPES`, an
architecture outside `ARCHITECTURES`, mixture-of-experts files, partial rotary, yarn / longrope
scaling and Llama 3.1's `rope_freqs.weight`. A truncated file or an unknown tensor type names the
tensor (`open_gguf`).
"""

from __future__ import annotations

import logging
import math
import os
import pathlib
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from flan_jax.convert import checkpoint, hf_import, mapping
from flan_jax.model.config import ModelConfig
from flan_jax.model.hf_config import UnsupportedConfigError

# GGML tensor types we dequantise; each is proven against transformers' GGUF loading in the tests.
SUPPORTED_TYPES = ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1")

# GGUF general.architecture -> transformers model_type, for the families our model implements.
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma", "phi3": "phi3"}

# Llama-architecture tensors whose rows llama.cpp permutes, with the head count of each.
_PERMUTED = {"self_attn.q_proj": "num_attention_heads", "self_attn.k_proj": "num_key_value_heads"}


class GGUFError(ValueError):
    """A GGUF file that cannot be read or converted; the message names the file and the tensor or key."""


# ---------------------------------------------------------------------------------------- reading
def open_gguf(path: str | os.PathLike):
    """A `gguf.GGUFReader` of `path`, with truncation and unknown tensor types reported by tensor name.

    The reader memory-maps the file, so opening reads only the header; tensors are read when
    dequantised.
    """
    import gguf

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GGUF file {path} does not exist")
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise GGUFError(f"{path}: not a GGUF file (it does not start with the bytes 'GGUF')")

    class CheckedReader(gguf.GGUFReader):
        # gguf==0.19.0's reader: _build_tensors(start_offs, fields) turns the tensor infos into
        # memory-mapped arrays. Checked first, so the error names the tensor instead of numpy's
        # "cannot reshape array of size ...".
        def _build_tensors(self, start_offs: int, fields: list) -> None:
            size = len(self.data)
            for field in fields:
                _, name_data, _, dims, raw_type, offset = field.parts
                name = bytes(name_data).decode("utf-8", errors="replace")
                try:
                    qtype = gguf.GGMLQuantizationType(int(raw_type[0]))
                except ValueError:
                    raise GGUFError(f"{path}: tensor {name!r} has GGML type {int(raw_type[0])}, which the gguf "
                                    f"package (and flan_jax) does not know; supported: {SUPPORTED_TYPES}") from None
                block, type_size = gguf.GGML_QUANT_SIZES[qtype]
                end = int(start_offs + offset[0]) + math.prod(int(d) for d in dims) * type_size // block
                if end > size:
                    raise GGUFError(f"{path}: truncated: tensor {name!r} ends at byte {end:,} but the file has "
                                    f"{size:,} bytes; download it again")
            super()._build_tensors(start_offs, fields)

    try:
        return CheckedReader(path)
    except GGUFError:
        raise
    except (ValueError, IndexError, OverflowError, UnicodeDecodeError, KeyError) as error:
        raise GGUFError(f"{path}: not a complete GGUF file (truncated or corrupt?): {error}") from None


def metadata(reader) -> dict[str, Any]:
    """Every metadata key -> its value (strings, numbers, lists), as the GGUF stores it."""
    return {name: field.contents() for name, field in reader.fields.items()}


def _float(value: Any) -> float:
    """A float32 metadata value as the decimal its author wrote (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def hf_config_from_gguf(meta: Mapping[str, Any], tensor_names: set[str], *, source: str) -> dict[str, Any]:
    """The transformers `config.json` dict a GGUF's metadata describes; refuses what we cannot run."""
    arch = meta.get("general.architecture")
    if arch not in ARCHITECTURES:
        raise GGUFError(f"{source}: general.architecture={arch!r} is not supported; supported: {sorted(ARCHITECTURES)}")

    def get(key: str, default: Any = ...) -> Any:
        full = f"{arch}.{key}"
        if full in meta:
            return meta[full]
        if default is ...:
            raise GGUFError(f"{source}: metadata key {full!r} is missing")
        return default

    for key in ("expert_count", "expert_used_count"):
        if get(key, 0):
            raise GGUFError(f"{source}: {arch}.{key}={get(key)}: mixture-of-experts models are not supported")
    d_model, n_heads = int(get("embedding_length")), int(get("attention.head_count"))
    head_dim = int(get("attention.key_length", d_model // n_heads))
    if int(get("attention.value_length", head_dim)) != head_dim:
        raise GGUFError(f"{source}: {arch}.attention.value_length differs from key_length: not supported")
    if int(get("rope.dimension_count", head_dim)) != head_dim:
        raise GGUFError(f"{source}: {arch}.rope.dimension_count={get('rope.dimension_count')} < head_dim={head_dim} "
                        "(partial rotary embeddings) is not supported")
    n_kv = get("attention.head_count_kv", n_heads)
    if isinstance(n_kv, list):
        raise GGUFError(f"{source}: {arch}.attention.head_count_kv varies per layer: not supported")
    if "rope_freqs.weight" in tensor_names:
        raise GGUFError(f"{source}: tensor 'rope_freqs.weight' (Llama 3.1-style rope scaling) is not supported; "
                        "convert the original Hugging Face checkpoint with --from_hf instead")
    rope = {"rope_type": "default", "rope_theta": _float(get("rope.freq_base", 10_000.0))}
    scaling = get("rope.scaling.type", "none")
    if scaling == "linear":
        rope.update(rope_type="linear", factor=_float(get("rope.scaling.factor")))
    elif scaling != "none":
        raise GGUFError(f"{source}: {arch}.rope.scaling.type={scaling!r} is not supported (none, linear)")
    tokens = meta.get("tokenizer.ggml.tokens")
    hf: dict[str, Any] = dict(
        model_type=ARCHITECTURES[arch],
        vocab_size=int(get("vocab_size", len(tokens) if tokens is not None else ...)),
        hidden_size=d_model,
        intermediate_size=int(get("feed_forward_length")),
        num_hidden_layers=int(get("block_count")),
        num_attention_heads=n_heads,
        num_key_value_heads=int(n_kv),
        head_dim=head_dim,
        max_position_embeddings=int(get("context_length", 2048)),
        rms_norm_eps=_float(get("attention.layer_norm_rms_epsilon", 1e-6)),
        rope_parameters=rope,
        tie_word_embeddings="output.weight" not in tensor_names,
        hidden_act="gelu_pytorch_tanh" if arch == "gemma" else "silu",
    )
    if arch in ("llama", "qwen3"):
        hf.update(attention_bias="blk.0.attn_q.bias" in tensor_names)
    if arch == "phi3":
        hf["sliding_window"] = int(get("attention.sliding_window", 0)) or None
    for role in ("bos", "eos", "pad", "unk"):
        key = {"pad": "padding", "unk": "unknown"}.get(role, role)
        if f"tokenizer.ggml.{key}_token_id" in meta:
            hf[f"{role}_token_id"] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return hf


def check_tensor_types(reader, *, source: str) -> None:
    """Refuses (by tensor name and type) a file holding a tensor type we do not dequantise."""
    unsupported = [f"{t.name} ({t.tensor_type.name})" for t in reader.tensors if t.tensor_type.name not in SUPPORTED_TYPES]
    if unsupported:
        raise GGUFError(
            f"{source}: {len(unsupported)} tensor(s) of a type flan_jax does not dequantise: {unsupported[:5]}; "
            f"supported: {SUPPORTED_TYPES}. Use a GGUF of one of those types (Q8_0 keeps the most accuracy), "
            "or the original Hugging Face checkpoint with --from_hf."
        )


def _gguf_names(cfg: ModelConfig, arch: str) -> dict[str, str]:
    """GGUF tensor name -> the HF name our rules use, from the gguf package's name tables."""
    import gguf

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch)
    table = gguf.get_tensor_name_map(model_arch, cfg.n_layers)
    names = {}
    for rule in mapping.rules(cfg):
        for key in rule.hf_keys:
            base, suffix = key.rsplit(".", 1)
            gguf_name = table.get_name(base)
            if gguf_name is not None:
                names[f"{gguf_name}.{suffix}"] = key
    return names


def _undo_llama_cpp(arch: str, hf_key: str, array: np.ndarray, hf_config: Mapping[str, Any]) -> np.ndarray:
    """The HF tensor llama.cpp's converter started from (see the module docstring)."""
    if arch == "llama":
        for proj, heads_key in _PERMUTED.items():
            if f".{proj}." in hf_key:
                heads = int(hf_config[heads_key])
                # llama.cpp: w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2); inverted:
                return array.reshape(heads, array.shape[0] // heads // 2, 2, *array.shape[1:]).swapaxes(1, 2).reshape(array.shape)
    if arch == "gemma" and hf_key.endswith("norm.weight"):
        return array - np.float32(1.0)
    return array


def gguf_tensors(reader, cfg: ModelConfig, hf_config: Mapping[str, Any], *, source: str):
    """hf_import.SourceTensor for every tensor of the file; dequantised only when loaded."""
    import gguf

    arch = next(k for k, v in ARCHITECTURES.items() if v == hf_config["model_type"])
    names = _gguf_names(cfg, arch)
    for tensor in reader.tensors:
        key = names.get(tensor.name, tensor.name)

        def load(tensor=tensor, key=key) -> np.ndarray:
            try:
                array = np.array(gguf.dequantize(tensor.data, tensor.tensor_type), dtype=np.float32)
            except (ValueError, NotImplementedError) as error:
                raise GGUFError(f"{source}: cannot dequantise tensor {tensor.name!r} ({tensor.tensor_type.name}): {error}") from None
            return _undo_llama_cpp(arch, key, array, hf_config)

        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))  # GGUF lists dims innermost first
        yield hf_import.SourceTensor(key, shape, f"{source} (GGUF tensor {tensor.name!r})", load)


def metadata_fields(arch: str) -> dict[str, str]:
    """Our logical axes -> the GGUF metadata key that sets each size (for shape errors)."""
    keys = {"vocab": "vocab_size", "embed": "embedding_length", "heads": "attention.head_count",
            "kv_heads": "attention.head_count_kv", "head_dim": "attention.key_length", "mlp": "feed_forward_length",
            "positions": "context_length"}
    return {axis: f"{arch}.{key}" for axis, key in keys.items()}


def _convert(reader, cfg: ModelConfig, hf_config: Mapping[str, Any], path) -> Iterator[tuple[tuple, np.ndarray]]:
    arch = next(k for k, v in ARCHITECTURES.items() if v == hf_config["model_type"])
    tensors = gguf_tensors(reader, cfg, hf_config, source=str(path))
    return hf_import.convert_tensors(tensors, cfg, source=str(path), config_name=f"{path}'s metadata",
                                     field_names=metadata_fields(arch))


def read_gguf(path: str | os.PathLike) -> tuple[Any, dict[str, Any], dict[str, Any], ModelConfig]:
    """(reader, metadata, HF config dict, ModelConfig) of a GGUF, every check done, nothing dequantised."""
    source = str(path)
    reader = open_gguf(path)
    meta = metadata(reader)
    hf_config = hf_config_from_gguf(meta, {t.name for t in reader.tensors}, source=source)
    check_tensor_types(reader, source=source)
    try:
        cfg = ModelConfig.from_hf_config(hf_config)
    except (UnsupportedConfigError, ValueError, TypeError) as error:
        raise GGUFError(f"{source}: its metadata describes a model we cannot build: {error}") from None
    return reader, meta, hf_config, cfg


def iter_gguf_params(path: str | os.PathLike) -> tuple[ModelConfig, Iterator[tuple[tuple, np.ndarray]]]:
    """(ModelConfig, iterator of (our param path, float32 array)) for a GGUF file."""
    reader, _, hf_config, cfg = read_gguf(path)
    return cfg, _convert(reader, cfg, hf_config, path)


def load_gguf_params(path: str | os.PathLike) -> tuple[ModelConfig, dict[tuple, np.ndarray]]:
    """(ModelConfig, flat {path: array}) of a GGUF, all in memory (tests, small models)."""
    cfg, params = iter_gguf_params(path)
    return cfg, dict(params)


def convert_from_gguf(path: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer: bool = True) -> ModelConfig:
    """`python -m flan_jax.convert --from_gguf=FILE --out=OUT_DIR`: weights, config and tokenizer.

    The tokenizer (tokenizer.json + tokenizer_config.json with the chat template) is rebuilt from
    the GGUF's metadata (gguf_tokenizer.py); `tokenizer=False` converts the weights only. Every
    check runs before the first byte is written; the output is staged (checkpoint.staged_folder).
    """
    from flan_jax.convert import gguf_tokenizer

    reader, meta, hf_config, cfg = read_gguf(path)
    tokenizer_files = gguf_tokenizer.tokenizer_files(meta, source=str(path)) if tokenizer else {}
    params = _convert(reader, cfg, hf_config, path)
    with checkpoint.staged_folder(out_dir) as staging:
        count = hf_import.write_converted(staging, cfg, params, hf_config)
        for name, text in tokenizer_files.items():
            (staging / name).write_text(text, encoding="utf-8")
    logging.info("Converted %s (%s, %d tensors dequantised to float32) to %s; tokenizer files: %s",
                 path, cfg.family, count, out_dir, sorted(tokenizer_files))
    return cfg
