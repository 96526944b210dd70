"""Packing variable-length examples into fixed-length rows (docs/design.md §4).

`pack` uses grain's best-fit packer: it keeps `num_packing_bins` open rows, puts each example into the
row it fills most tightly, and emits all rows once an example fits in none. Examples never cross a row
boundary; `segment_ids` (1, 2, ... per example, 0 on padding) and `positions` (restarting at 0 per
example) let attention and RoPE keep them apart. `pad` is the one-example-per-row baseline.

The four feature columns are stacked into a single `[length, 4]` int32 array before packing, so grain
keeps one set of buffers instead of four (memory is `num_packing_bins * seq_len * 24` bytes per stream)
and copies one array per example. Loss weights are 0/1 and are cast back to float32 afterwards.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping

import grain
import numpy as np

from flan_jax.data.features import FEATURE_KEYS

BATCH_KEYS = ("input_tokens", "target_tokens", "segment_ids", "positions", "loss_weights", "prefix_mask")
_STACKED = "features"


def _stack(features: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return {_STACKED: np.stack([features[k].astype(np.int32, copy=False) for k in FEATURE_KEYS], axis=1)}


def _unstack(stacked: np.ndarray, segment_ids: np.ndarray, positions: np.ndarray) -> dict[str, np.ndarray]:
    row = {key: np.ascontiguousarray(stacked[..., i]) for i, key in enumerate(FEATURE_KEYS)}
    row["loss_weights"] = row["loss_weights"].astype(np.float32)
    row["segment_ids"] = segment_ids.astype(np.int32, copy=False)
    row["positions"] = positions.astype(np.int32, copy=False)
    return {key: row[key] for key in BATCH_KEYS}


def _from_packed(packed: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    return _unstack(packed[_STACKED], packed[f"{_STACKED}_segment_ids"], packed[f"{_STACKED}_positions"])


def pack(
    examples: grain.IterDataset, *, seq_len: int, num_packing_bins: int, seed: int
) -> grain.IterDataset:
    """Rows of `seq_len` packed with best fit from a stream of feature dicts (see features.py).

    `seed` only orders the rows of each group of `num_packing_bins` (so the longest examples do not always
    come first); the same stream and seed always give the same rows.
    """
    if num_packing_bins < 1:
        raise ValueError(f"num_packing_bins={num_packing_bins} must be at least 1")
    packed = grain.experimental.BestFitPackIterDataset(
        examples.map(_stack),
        length_struct={_STACKED: seq_len},
        num_packing_bins=num_packing_bins,
        seed=seed,
        shuffle_bins=True,
    )
    return packed.map(_from_packed)


def pad_one(features: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
    """One example alone in a row of `seq_len`, padded with zeros (segment 1, padding segment 0)."""
    length = len(features["input_tokens"])
    if length > seq_len:
        raise ValueError(f"example of {length} features does not fit in seq_len={seq_len}: truncate it first")
    stacked = np.zeros((seq_len, len(FEATURE_KEYS)), dtype=np.int32)
    stacked[:length] = _stack(features)[_STACKED]
    segment_ids = np.zeros(seq_len, dtype=np.int32)
    segment_ids[:length] = 1
    positions = np.zeros(seq_len, dtype=np.int32)
    positions[:length] = np.arange(length, dtype=np.int32)
    return _unstack(stacked, segment_ids, positions)


def pad(examples: grain.IterDataset, *, seq_len: int) -> grain.IterDataset:
    """One example per row (the baseline packing is compared against)."""
    return examples.map(functools.partial(pad_one, seq_len=seq_len))


def fill_rate(rows: Mapping[str, np.ndarray] | list[Mapping[str, np.ndarray]]) -> float:
    """Share of non-padding positions (segment_ids > 0) in a batch or a list of rows."""
    if isinstance(rows, Mapping):
        segment_ids = rows["segment_ids"]
    else:
        segment_ids = np.stack([row["segment_ids"] for row in rows])
    return float(np.count_nonzero(segment_ids)) / max(segment_ids.size, 1)
