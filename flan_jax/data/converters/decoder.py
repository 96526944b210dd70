"""The decoder-only converter of docs/design.md §4 (SFT): one example is one segment of a row.

A thin name for what `flan_jax.data.features` and `flan_jax.data.packing` already do, so the loader
can take any converter.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flan_jax.data import features, packing
from flan_jax.data.tokenizer import Tokenizer


class DecoderConverter:
    name = "decoder"
    batch_keys = packing.BATCH_KEYS

    def featurize(
        self, example: Mapping[str, Any], tokenizer: Tokenizer, config: features.FeatureConfig
    ) -> tuple[dict[str, np.ndarray] | None, features.Outcome]:
        return features.featurize(example, tokenizer, config)

    def build_row(self, examples: Sequence[Mapping[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
        return packing.build_row(examples, seq_len)

    def pad_one(self, example: Mapping[str, np.ndarray], seq_len: int) -> dict[str, np.ndarray]:
        return packing.pad_one(example, seq_len)

    def __repr__(self) -> str:
        return "DecoderConverter()"


DECODER = DecoderConverter()
