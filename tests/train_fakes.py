"""Tiny stand-ins shared by the trainer tests: an NNX LM with logical axes and packed batches.

They follow the model and batch contracts of docs/design.md (§4, §5) so the trainer pieces can
be tested without the real model, data pipeline or tokenizer.
"""

from __future__ import annotations

import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from flan_jax import default_config, sharding


class TinyLM(nnx.Module):
    """Embedding -> RMS norm -> MLP (residual) -> untied output head."""

    def __init__(self, vocab: int = 32, d_model: int = 16, d_ff: int = 32, *, rngs: nnx.Rngs):
        init = jax.nn.initializers.normal(0.2)
        self.embed = nnx.Param(init(rngs.params(), (vocab, d_model)), logical_axes=("vocab", "embed"))
        self.norm_scale = nnx.Param(jnp.ones((d_model,)), logical_axes=("embed",))
        self.w_in = nnx.Param(init(rngs.params(), (d_model, d_ff)), logical_axes=("embed", "mlp"))
        self.w_out = nnx.Param(init(rngs.params(), (d_ff, d_model)), logical_axes=("mlp", "embed"))
        self.head = nnx.Param(init(rngs.params(), (d_model, vocab)), logical_axes=("embed", "vocab"))

    def __call__(self, input_tokens, *, positions=None, segment_ids=None, prefix_mask=None):
        x = jnp.take(self.embed[...], input_tokens, axis=0)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        h = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + 1e-6) * self.norm_scale[...]
        h = jax.nn.gelu(h @ self.w_in[...])
        h = sharding.constrain(h, ("batch", "length", "act_mlp"))
        x = x + h @ self.w_out[...]
        return (x @ self.head[...]).astype(jnp.float32)


def tiny_config(**train_overrides) -> ml_collections.ConfigDict:
    config = default_config.get_config()
    config.data.seq_len = 8
    config.data.batch_size = 8
    config.model.vocab_size = 32
    config.optimizer.warmup_steps = 0
    config.optimizer.learning_rate = 1e-2
    config.train.num_steps = 10
    for key, value in train_overrides.items():
        config.train[key] = value
    return config


def packed_batch(seed: int, rows: int = 8, length: int = 8, vocab: int = 32) -> dict[str, np.ndarray]:
    """A batch of the §4 packed format with 1-3 examples per row and some padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab, size=(rows, length + 1)).astype(np.int32)
    segment_ids = np.zeros((rows, length), np.int32)
    positions = np.zeros((rows, length), np.int32)
    for r in range(rows):
        used = rng.integers(length // 2, length + 1)
        cuts = np.sort(rng.choice(np.arange(1, used), size=min(2, used - 1), replace=False))
        bounds = [0, *[c for c in cuts if rng.random() < 0.6], used]
        for s, (a, b) in enumerate(zip(bounds[:-1], bounds[1:])):
            segment_ids[r, a:b] = s + 1
            positions[r, a:b] = np.arange(b - a)
    loss_weights = ((segment_ids > 0) & (rng.random((rows, length)) < 0.7)).astype(np.float32)
    return {
        "input_tokens": tokens[:, :-1] * (segment_ids > 0),
        "target_tokens": tokens[:, 1:] * (segment_ids > 0),
        "segment_ids": segment_ids,
        "positions": positions,
        "loss_weights": loss_weights,
        "prefix_mask": np.zeros((rows, length), np.int32),
    }


ROOT = pathlib.Path(__file__).resolve().parents[1]

# configs/demo.py shrunk to a model and batch that train in milliseconds per step on CPU.
TINY_DEMO = {
    "data.seq_len": 64,
    "data.batch_size": 8,
    "data.tokenizer.vocab_size": 400,
    "data.tokenizer.train_examples": 300,
    "model.vocab_size": 400,
    "model.d_model": 32,
    "model.n_layers": 1,
    "model.n_heads": 2,
    "model.n_kv_heads": 1,
    "model.head_dim": 16,
    "model.d_ff": 64,
    "model.max_positions": 64,
    "optimizer.warmup_steps": 2,
    "train.num_steps": 4,
    "train.log_every": 1,
    "train.progress_bar": False,
    "train.peak_flops_per_device": -1.0,
    "checkpoint.every_steps": 2,
    "eval.mixtures": (),
    "eval.max_examples_per_task": 2,
    "eval.max_new_tokens": 4,
    "eval.batch_size": 8,
}


def demo_overrides(tokenizer_path: str | pathlib.Path, base: dict | None = None, **overrides) -> dict:
    """`base` (TINY_DEMO) plus `overrides` (keys with "__" for dots, e.g. train__num_steps=6)."""
    values = dict(TINY_DEMO if base is None else base)
    values["data.tokenizer.path"] = str(tokenizer_path)
    values.update({k.replace("__", "."): v for k, v in overrides.items()})
    return values


def demo_config(overrides: dict, config_file: str = "demo.py") -> ml_collections.ConfigDict:
    """configs/<config_file> with `overrides` ({"a.b": value})."""
    spec = importlib.util.spec_from_file_location("demo_config", ROOT / "configs" / config_file)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for dotted, value in overrides.items():
        *parents, leaf = dotted.split(".")
        node = config
        for p in parents:
            node = node[p]
        node[leaf] = value
    return config


def cli_args(overrides: dict) -> list[str]:
    """The same overrides as `python -m flan_jax.train` flags."""
    return [f"--config.{k}={v!r}" if isinstance(v, tuple) else f"--config.{k}={v}" for k, v in overrides.items()]


def train_tokenizer(directory: pathlib.Path) -> pathlib.Path:
    """A small sentencepiece model of the demo mixture, trained once and shared by the tests."""
    from flan_jax import data
    from flan_jax.data import tokenizer as tokenizer_lib

    path = directory / "tokenizer.model"
    if not path.exists():
        config = demo_config(demo_overrides(""))
        data.import_task_modules(config.data.task_modules)
        tokenizer_lib.load_tokenizer(config.data.tokenizer, workdir=directory, train_mixture=config.data.train_mixture)
    return path


def compilation_cache(tmp_path_factory):
    """Fixture body: a persistent XLA compilation cache shared by the trainer tests of a session.

    Every `train()` call (and every subprocess run) builds new jitted functions; with the cache the
    identical programs compile once per session instead of once per run.
    """
    path = str(tmp_path_factory.getbasetemp() / "jax_compilation_cache")
    names = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs", "jax_persistent_cache_min_entry_size_bytes")
    previous = {name: getattr(jax.config, name) for name in names}
    for name, value in zip(names, (path, 0.0, 0)):
        jax.config.update(name, value)
    yield path
    for name, value in previous.items():
        jax.config.update(name, value)


def subprocess_env(cache_dir: str, **extra: str) -> dict[str, str]:
    """Environment for `python -m flan_jax.train` children: repo importable, shared compile cache."""
    import os

    env = dict(os.environ)
    env.update(
        PYTHONPATH=str(ROOT),
        JAX_COMPILATION_CACHE_DIR=cache_dir,
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    env.update(extra)
    return env


def counting_iterator():
    """A grain iterator of {"x": [i, i]}: a data position a checkpoint saves and restores."""
    import grain

    return iter(grain.MapDataset.range(100).map(lambda i: {"x": np.full((2,), i)}).to_iter_dataset())


def save_then_restore(directory, state, config, abstract):
    """Saves `state` as step 1 (data one element in) and restores the newest checkpoint into
    `abstract` (e.g. another layer layout's abstract state): the restored train state."""
    from flan_jax.train import checkpointing

    it = counting_iterator()
    next(it)
    ckpt = checkpointing.Checkpointer(directory, config.checkpoint)
    ckpt.save(1, state, it, config)
    ckpt.close()
    return checkpointing.Checkpointer(directory, config.checkpoint).restore_latest(abstract, counting_iterator())


def run_steps(train_step, state, batches, mesh, rules):
    """(state, losses) after one `train_step` per host batch (placed as the trainer places it)."""
    from flan_jax.train import partitioning

    losses = []
    with jax.set_mesh(mesh):
        for batch in batches:
            state, metrics = train_step(state, partitioning.global_batch(batch, partitioning.batch_sharding(mesh, rules)))
            losses.append(float(metrics["loss"]))
    return state, losses
