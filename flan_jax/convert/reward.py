"""Reward models <-> Hugging Face `*ForSequenceClassification` (num_labels=1), safetensors only.

Our reward model is the decoder plus a scalar `score` head ([d_model, 1], flan_jax.model.transformer)
read at the last token of a response. transformers' `LlamaForSequenceClassification` (and the
Mistral, Qwen2, Gemma, GPT-2 ones) is the same network: the decoder under the same tensor names as
its causal LM (`model.*` / `transformer.*`), no LM head, and `score.weight` [1, d_model] applied to
the hidden state of the last non-padding token. So export writes the decoder through the causal-LM
rules (flan_jax.convert.mapping) without the LM head plus `score.weight`, and sets `num_labels=1`
and a `pad_token_id` (transformers needs it to find the last token of each row).

Import reads such a folder back into our parameters. A classification checkpoint carries no LM
head: an untied model gets a zero `lm_head` (never used by a reward model; logged), so the result
is an ordinary parameter tree of the decoder with `heads=("score",)`.
"""

from __future__ import annotations

import json
import logging
import os
import pathlib

import numpy as np

from flan_jax.convert import checkpoint, hf_import, mapping
from flan_jax.model.config import ModelConfig
from flan_jax.model.hf_config import to_hf

SCORE = ("scalar_heads", "score")
HF_SCORE = "score.weight"
LM_HEAD = ("lm_head",)


def _architecture(causal: str) -> str:
    for suffix in ("ForCausalLM", "LMHeadModel"):
        if causal.endswith(suffix):
            return causal[: -len(suffix)] + "ForSequenceClassification"
    raise ValueError(f"no sequence-classification architecture is known for {causal!r}")


def _decoder_rules(cfg: ModelConfig) -> list[mapping.Rule]:
    return [rule for rule in mapping.rules(cfg) if LM_HEAD not in rule.paths]


def reward_hf_tensors(cfg: ModelConfig, params) -> dict[str, np.ndarray]:
    """HF tensor name -> array of a reward model (`params` with the `score` head)."""
    flat = {path: np.asarray(value) for path, value in checkpoint.unrolled_flat(params).items()}  # either layer layout
    if SCORE not in flat:
        raise ValueError("these parameters have no 'score' head: is this a reward model (objective reward_model)?")
    tensors = {}
    for rule in _decoder_rules(cfg):
        tensors.update(zip(rule.hf_keys, rule.to_hf([flat[path] for path in rule.paths])))
    tensors[HF_SCORE] = flat[SCORE].T  # [d_model, 1] -> torch Linear's [num_labels=1, d_model]
    return {key: np.ascontiguousarray(value) for key, value in tensors.items()}


def write_hf_reward_model(
    out_dir: str | os.PathLike,
    cfg: ModelConfig,
    params,
    *,
    pad_token_id: int = 0,
    token_ids: dict | None = None,
    tokenizer_dir: str | os.PathLike | None = None,
) -> pathlib.Path:
    """Writes config.json + model.safetensors of a `*ForSequenceClassification` with num_labels=1."""
    from safetensors.numpy import save_file

    out = pathlib.Path(out_dir)
    tensors = reward_hf_tensors(cfg, params)
    hf_config = to_hf(cfg, dtype=str(tensors[HF_SCORE].dtype), token_ids={**(token_ids or {}), "pad_token_id": pad_token_id})
    hf_config["architectures"] = [_architecture(hf_config["architectures"][0])]
    hf_config.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    with checkpoint.staged_folder(out, flag="--to_hf") as staging:  # no half-written folder after a failure
        save_file(tensors, os.fspath(staging / "model.safetensors"), metadata={"format": "pt"})
        (staging / "config.json").write_text(json.dumps(hf_config, indent=2) + "\n")
        if tokenizer_dir is not None:
            checkpoint.copy_tokenizer_files(tokenizer_dir, staging)
    logging.info("Wrote a %s reward model (%d tensors) to %s", hf_config["architectures"][0], len(tensors), out)
    return out


def load_hf_reward_model(hf_dir: str | os.PathLike) -> tuple[ModelConfig, dict[tuple, np.ndarray]]:
    """(ModelConfig, flat params with the `score` head) of an HF `*ForSequenceClassification` folder."""
    from safetensors import safe_open

    hf_dir = pathlib.Path(hf_dir)
    hf_config = hf_import.read_hf_config(hf_dir)
    architecture = (hf_config.get("architectures") or ["?"])[0]
    if not architecture.endswith("ForSequenceClassification") or hf_config.get("num_labels", len(hf_config.get("id2label", {0: 0}))) != 1:
        raise ValueError(
            f"{hf_dir}: expected a *ForSequenceClassification with num_labels=1 (a reward model), "
            f"got {architecture} with {hf_config.get('num_labels', len(hf_config.get('id2label', {})))} labels"
        )
    cfg = ModelConfig.from_hf_config(hf_config)
    rules = _decoder_rules(cfg)
    wanted = {key for rule in rules for key in rule.hf_keys} | {HF_SCORE}
    tensors: dict[str, np.ndarray] = {}
    for file in hf_import.safetensors_files(hf_dir):
        with safe_open(os.fspath(file), framework="numpy") as f:
            for key in f.keys():
                if key not in wanted:
                    if not key.endswith(mapping.IGNORED_SUFFIXES):
                        raise ValueError(f"{file}: tensor {key} has no place in a {cfg.family} reward model")
                    continue
                tensors[key] = f.get_tensor(key)
    missing = sorted(wanted - set(tensors))
    if missing:
        raise ValueError(f"{hf_dir}: tensors missing from the safetensors files: {missing[:10]}")
    flat: dict[tuple, np.ndarray] = {}
    for rule in rules:
        flat.update(zip(rule.paths, rule.to_ours([tensors[key] for key in rule.hf_keys])))
    score = tensors[HF_SCORE]
    if score.shape != (1, cfg.d_model):
        raise ValueError(f"{hf_dir}: {HF_SCORE} has shape {score.shape}, expected (1, {cfg.d_model})")
    flat[SCORE] = np.ascontiguousarray(score.T)
    if not cfg.tie_embeddings:
        logging.info("%s: a classification checkpoint has no LM head; the reward model gets a zero lm_head", hf_dir)
        flat[LM_HEAD] = np.zeros((cfg.d_model, cfg.vocab_size), score.dtype)
    return cfg, flat
