"""The "reward_model" reward: a trained reward model's `score` head on each completion.

The model is the preference stage's `reward_model` run (its workdir: newest checkpoint, config and
tokenizer) or a Hugging Face `*ForSequenceClassification` folder with num_labels=1 (its
tokenizer.json), loaded once onto the run's mesh and frozen. Its tokenizer may differ from the
policy's, so it reads text: `[BOS] + tokens(prompt) + tokens(completion)`, the layout its training
pairs had (flan_jax.data.converters.pairs), and the score is the head at the completion's last token
(where `objectives/reward.py` reads it, and transformers' classifier reads the last non-padding
token). A row longer than the model's `data.seq_len` loses the start of its prompt, as pairs do.
Its parameters are fingerprinted into the RL run's checkpoints, so a resume against another reward
model is refused.
"""

from __future__ import annotations

import json
import logging
import pathlib
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from flan_jax.rl.rewards import Completion

SCORE_HEAD = "score"


class RewardModelReward:
    def __init__(self, parts, params, tokenizer, *, mesh, rules, seq_len: int, batch_size: int, source: str):
        from flan_jax.train import partitioning, state as state_lib

        self.parts, self.params, self.tokenizer = parts, params, tokenizer
        self.mesh, self.rules = mesh, rules
        self.seq_len, self.source = int(seq_len), source
        data_parallel = mesh.shape["data"] * mesh.shape["fsdp"]
        self.batch_size = -(-max(int(batch_size), 1) // data_parallel) * data_parallel
        self.fingerprint = state_lib.fingerprint(params)
        self._batch_sharding = partitioning.batch_sharding(mesh, rules)
        self._score = jax.jit(self._score_rows, in_shardings=(parts.param_shardings, self._batch_sharding))

    @classmethod
    def from_config(cls, config: Any, runtime: Any) -> RewardModelReward:
        path = str(config.rl.reward_model)
        if not path:
            raise ValueError("reward 'reward_model' needs config.rl.reward_model: a reward_model run's workdir or a HF reward model folder")
        cfg, tokenizer, seq_len = _describe_source(path)
        from flan_jax.model import registry
        from flan_jax.train import loop, state as state_lib
        from flax import nnx

        parts = state_lib.ModelParts(
            lambda: registry.build_model(cfg, rngs=nnx.Rngs(0), heads=(SCORE_HEAD,)), runtime.mesh, runtime.rules
        )
        params = loop.load_init_params(path, parts, cfg, runtime.mesh)
        logging.info("reward_model: %s (%s, seq_len %d)", path, cfg.family, seq_len)
        return cls(parts, params, tokenizer, mesh=runtime.mesh, rules=runtime.rules, seq_len=seq_len,
                   batch_size=int(config.rl.reward_model_batch_size), source=path)

    def _score_rows(self, params, batch):
        from flan_jax import sharding

        with sharding.use_rules(self.mesh, self.rules):
            model = self.parts.merge(params)
            hidden, _ = model.hidden_states(batch["tokens"], positions=batch["positions"], segment_ids=batch["segment_ids"])
            scores = model.scalar_head(SCORE_HEAD, hidden)
        return jnp.take_along_axis(scores, batch["last"], axis=1)  # [rows, 1]

    def rows(self, completions: Sequence[Completion]) -> list[list[int]]:
        """`[BOS] prompt completion` of each completion in this model's vocabulary, cut to its seq_len."""
        texts = [str(c.example["inputs"]) for c in completions] + [c.text for c in completions]
        encoded = self.tokenizer.encode_batch(texts)
        prompts, responses = encoded[: len(completions)], encoded[len(completions):]
        rows = []
        for prompt, response in zip(prompts, responses):
            response = response[: self.seq_len - 1]
            room = self.seq_len - 1 - len(response)
            kept = prompt[max(len(prompt) - room, 0):] if room > 0 else []
            rows.append([self.tokenizer.bos_id, *kept, *response])
        return rows

    def __call__(self, completions: Sequence[Completion]) -> list[float]:
        rows = self.rows(completions)
        out: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start:start + self.batch_size]
            tokens = np.zeros((self.batch_size, self.seq_len), np.int32)
            segments = np.zeros_like(tokens)
            last = np.zeros((self.batch_size, 1), np.int32)  # 2-D: rows shard like the tokens
            for i, row in enumerate(chunk):
                tokens[i, : len(row)] = row
                segments[i, : len(row)] = 1
                last[i, 0] = len(row) - 1
            positions = np.broadcast_to(np.arange(self.seq_len, dtype=np.int32), tokens.shape).copy()
            batch = {"tokens": tokens, "positions": positions, "segment_ids": segments, "last": last}
            with jax.set_mesh(self.mesh):
                scores = np.asarray(jax.device_get(self._score(self.params, batch)))
            out.extend(float(s) for s in scores[: len(chunk), 0])
        return out


def _describe_source(path: str):
    """(model config, tokenizer, max tokens per row) of a reward-model workdir or HF folder."""
    from flan_jax.data.tokenizer import HFTokenizer, load_tokenizer
    from flan_jax.model import registry
    from flan_jax.train import checkpointing

    folder = pathlib.Path(path)
    if (folder / "checkpoints").is_dir():
        run_config = checkpointing.config_from_dict(json.loads((folder / "config.json").read_text()))
        if run_config.objective.name != "reward_model":
            raise ValueError(f"config.rl.reward_model={path}: that run trained objective {run_config.objective.name!r}, not 'reward_model'")
        tokenizer = load_tokenizer(run_config.data, workdir=folder)
        return registry.config_from(run_config.model), tokenizer, int(run_config.data.seq_len)
    if (folder / "config.json").is_file():
        from flan_jax import convert

        cfg, _ = convert.load_hf_reward_model(folder)
        if not (folder / "tokenizer.json").is_file():
            raise ValueError(f"config.rl.reward_model={path}: a HF reward model folder needs its tokenizer.json")
        return cfg, HFTokenizer(folder / "tokenizer.json"), int(cfg.max_positions)
    raise ValueError(f"config.rl.reward_model={path}: neither a run's workdir (checkpoints/) nor a HF model folder (config.json)")
