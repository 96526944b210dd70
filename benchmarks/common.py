"""What the training benchmarks build alike: a random full-length batch, and the trainer's jitted
step for a config on the first devices, assembled from the trainer's own pieces so that a
benchmark times what `python -m flan_jax.train` runs.

Imports jax lazily: the benchmarks' parent processes (which only start children) stay light.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np


def random_batch(batch: int, seq_len: int, vocab_size: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Decoder rows of random tokens, one segment per row, loss on every position: step time and
    memory do not depend on the values, and no row is padding."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(1, vocab_size, size=(batch, seq_len + 1)).astype(np.int32)
    return {
        "input_tokens": tokens[:, :-1],
        "target_tokens": tokens[:, 1:],
        "segment_ids": np.ones((batch, seq_len), np.int32),
        "positions": np.broadcast_to(np.arange(seq_len, dtype=np.int32), (batch, seq_len)).copy(),
        "loss_weights": np.ones((batch, seq_len), np.float32),
        "prefix_mask": np.zeros((batch, seq_len), np.int32),
    }


@dataclasses.dataclass
class TrainerStep:
    """The trainer's jitted step for one config, with its state at step 0 and what places a batch."""

    mesh: Any
    rules: Any
    model_cfg: Any
    parts: Any
    state: Any
    step: Any

    def place(self, batch: dict[str, np.ndarray]):
        """`batch` sharded over the mesh as the trainer places its batches."""
        from flan_jax.train import partitioning

        return partitioning.global_batch(batch, partitioning.batch_sharding(self.mesh, self.rules))


def trainer_step(config, n_devices: int = 1, total_steps: int = 1000) -> TrainerStep:
    """`config`'s model, optimizer (schedule over `total_steps`) and state on the first `n_devices`
    devices, as the trainer builds them (family registry, LoRA / trainable filter, the frozen base
    slot initialised from the seed), and its jitted step."""
    import jax

    from flan_jax.train import loop, optimizer, partitioning, state as state_lib, step as step_lib

    mesh = partitioning.make_mesh(config.mesh, jax.devices()[:n_devices])
    rules = partitioning.axis_rules(config.mesh)
    model_cfg, parts = loop.build_model(config, mesh, rules)
    tx, schedule = optimizer.make_optimizer(config.optimizer, total_steps)
    shardings = state_lib.state_shardings(parts, tx, mesh)
    state = state_lib.init_state(parts, tx, shardings, 0, mesh)
    if parts.has_base:
        state = state.replace(frozen={state_lib.BASE: state_lib.init_base(parts, mesh)})
    train_step = step_lib.make_train_step(parts, tx, schedule, config, shardings, mesh, rules)
    return TrainerStep(mesh, rules, model_cfg, parts, state, train_step)
