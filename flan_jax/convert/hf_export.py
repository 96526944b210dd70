"""Our parameters -> a Hugging Face folder (config.json + model.safetensors) transformers loads.

Large models are written in 5 GiB shards with the usual index file, one shard in memory at a time.

Sources: a converted checkpoint (`--checkpoint=PATH`) or a training run (`--workdir=DIR [--step=N]`,
read through `flan_jax.train.checkpointing.load_model`; a LoRA run's adapters are merged into the
weights); a reward-model run is written as a `*ForSequenceClassification` (flan_jax.convert.reward).
Tied models write no `lm_head.weight`, as transformers 5 does itself. A LoRA run's adapters alone
go to a PEFT folder instead (`--to_peft`, convert/peft.py).
"""

from __future__ import annotations

import json
import logging
import os
import pathlib
from collections.abc import Mapping, Sequence

import numpy as np

from flan_jax.convert import checkpoint, mapping
from flan_jax.model.config import ModelConfig
from flan_jax.model.hf_config import to_hf


MAX_SHARD_BYTES = 5 * 2**30  # transformers' own default shard size


def _flat_params(cfg: ModelConfig, params) -> dict[tuple, np.ndarray]:
    flat = {path: np.asarray(value) for path, value in checkpoint.unrolled_flat(params).items()}
    checkpoint._check_same_params("export", checkpoint.abstract_params(cfg), {p: v.shape for p, v in flat.items()})
    return flat


def _convert_rule(rule: mapping.Rule, flat: Mapping[tuple, np.ndarray], dtype: str | None) -> dict[str, np.ndarray]:
    arrays = rule.to_hf([flat[path] for path in rule.paths])
    return {
        key: np.ascontiguousarray(array if dtype is None else array.astype(np.dtype(dtype)))
        for key, array in zip(rule.hf_keys, arrays)
    }


def hf_tensors(cfg: ModelConfig, params, *, dtype: str | None = None) -> dict[str, np.ndarray]:
    """HF tensor name -> array for `params` (an nnx.State, nested or flat pure dict), all in memory."""
    flat = _flat_params(cfg, params)
    return {k: v for rule in mapping.rules(cfg) for k, v in _convert_rule(rule, flat, dtype).items()}


def _shard_plan(rules: list[mapping.Rule], flat, dtype: str | None, max_bytes: int) -> list[list[mapping.Rule]]:
    """Rules grouped into consecutive shards of at most `max_bytes` (one tensor may exceed it alone)."""
    shards: list[list[mapping.Rule]] = [[]]
    size = 0
    for rule in rules:
        itemsize = np.dtype(dtype).itemsize if dtype else flat[rule.paths[0]].dtype.itemsize
        nbytes = sum(flat[p].size for p in rule.paths) * itemsize
        if shards[-1] and size + nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(rule)
        size += nbytes
    return shards


def write_hf(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params,
    *,
    dtype: str | None = None,
    token_ids: Mapping[str, int | None] | None = None,
    tokenizer_dir: str | os.PathLike | Sequence[str | os.PathLike] | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> pathlib.Path:
    """Writes config.json, the weights and (from `tokenizer_dir`, or each of several) the tokenizer files.

    The weights go to `model.safetensors`, or, above `max_shard_bytes`, to shards
    `model-0000i-of-0000n.safetensors` with a `model.safetensors.index.json` (as transformers
    writes them); only one shard's HF tensors are in memory at a time. `out_dir` must be new or
    empty; everything is written into a temporary folder renamed to it at the end, so a failed
    export leaves no half-written model behind.
    """
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    flat = _flat_params(cfg, params)
    stored_dtype = dtype or str(next(iter(flat.values())).dtype)
    hf_config = to_hf(cfg, dtype=stored_dtype, token_ids=token_ids)
    shards = _shard_plan(mapping.rules(cfg), flat, dtype, max_shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    with checkpoint.staged_folder(out, flag="--to_hf") as staging:
        for i, shard in enumerate(shards):
            name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            tensors = {k: v for rule in shard for k, v in _convert_rule(rule, flat, dtype).items()}
            save_file(tensors, os.fspath(staging / name), metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(tensors, name))
            total += sum(t.nbytes for t in tensors.values())
            del tensors
        if len(shards) > 1:
            index = {"metadata": {"total_size": total}, "weight_map": weight_map}
            (staging / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        sources = [tokenizer_dir] if isinstance(tokenizer_dir, (str, os.PathLike)) else list(tokenizer_dir or [])
        for source in sources:
            checkpoint.copy_tokenizer_files(source, staging)
    logging.info("Wrote %d tensors (%s, %d file(s)) to %s", len(weight_map), stored_dtype, len(shards), out)
    return out


def plain_params(model, cfg: ModelConfig) -> dict:
    """The parameters of a plain model: LoRA adapters merged into their kernels (W + scale A B),
    and a frozen base held in another dtype cast back to `cfg.param_dtype`, so the export is one
    dtype throughout."""
    from flax import nnx

    from flan_jax.model import lora

    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    return lora.merged_params(params, lora.scales_of(model), dtype=cfg.param_dtype)


def _token_ids_from(hf_config_file: pathlib.Path) -> dict[str, int | None]:
    if not hf_config_file.is_file():
        return {}
    source = json.loads(hf_config_file.read_text())
    return {k: source[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in source}


def convert_checkpoint_to_hf(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike, *, dtype: str | None = None) -> None:
    """`--to_hf=OUT --checkpoint=PATH`: a converted (or hand-saved) checkpoint folder."""
    checkpoint_dir = pathlib.Path(checkpoint_dir)
    cfg, params = checkpoint.load_converted(checkpoint_dir)
    write_hf(out_dir, cfg, params, dtype=dtype, token_ids=_token_ids_from(checkpoint_dir / checkpoint.HF_CONFIG),
             tokenizer_dir=checkpoint_dir)


def convert_workdir_to_hf(workdir: str | os.PathLike, out_dir: str | os.PathLike, *, step: int | None = None,
                          dtype: str | None = None) -> int:
    """`--to_hf=OUT --workdir=DIR [--step=N]`: a training run's checkpoint; returns the step used."""
    from flan_jax.train import checkpointing

    model, config, used_step = checkpointing.load_model(workdir, step)
    cfg: ModelConfig = model.cfg
    params = plain_params(model, cfg)
    if getattr(model, "scalar_heads", None) is not None and "score" in model.scalar_heads:  # a reward model
        from flan_jax.convert import reward

        reward.write_hf_reward_model(out_dir, cfg, params, tokenizer_dir=workdir)
        return used_step
    token_ids = {}
    init_from = config.checkpoint.get("init_from", "") if hasattr(config, "checkpoint") else ""
    if init_from and (pathlib.Path(init_from) / checkpoint.MODEL_CONFIG).is_file():
        # A run started from converted weights: its architecture details that config.model cannot
        # express (rope scaling, norm eps, sliding window, ...) come from the converted checkpoint.
        converted = checkpoint.read_model_config(init_from).replace(param_dtype=cfg.param_dtype, dtype=cfg.dtype)
        if converted != cfg:
            logging.info("Using the architecture of %s (init_from) for the exported config", init_from)
        cfg = converted
        token_ids = _token_ids_from(pathlib.Path(init_from) / checkpoint.HF_CONFIG)
    tokenizer_dirs = [pathlib.Path(workdir)]
    tokenizer_path = config.data.tokenizer.path if hasattr(config, "data") else ""
    if tokenizer_path:  # a tokenizer the run read from elsewhere (e.g. a converted checkpoint)
        source = pathlib.Path(tokenizer_path)
        tokenizer_dirs.append(source if source.is_dir() else source.parent)
    write_hf(out_dir, cfg, params, dtype=dtype, token_ids=token_ids, tokenizer_dir=tokenizer_dirs)
    return used_step
