"""Feature converters: how a rendered example becomes token features and packed rows for one kind of model/objective.

seqio's idea (`LMFeatureConverter`, `EncDecFeatureConverter`): each converter lists the batch
features it produces, and the trainer asks for the one its objective needs. A converter provides

  name                         recorded in the data iterator's fingerprint (a resume checks it)
  batch_keys                   the arrays of every packed batch row
  featurize(example, tokenizer, config) -> (features | None, Outcome)   one example, counted outcome
  build_row(examples, seq_len) -> row                                   several examples in one row
  pad_one(features, seq_len) -> row                                     one example per row

A feature dict holds 1-D arrays of one length (`len(features["input_tokens"])`, what the packer
counts); `build_row` lays several of them into one row. Converters:

  decoder  docs/design.md §4: one segment per example (SFT)              (flan_jax.data.converters.decoder)
  pairs    a preference pair as two segments kept in one row (reward model, DPO family)  (.pairs)
"""

from __future__ import annotations

from typing import Any

from flan_jax.data.converters.decoder import DECODER, DecoderConverter
from flan_jax.data.converters.pairs import PAIRS, REFERENCE_FEATURE, PairConverter

CONVERTERS = {DECODER.name: DECODER, PAIRS.name: PAIRS}


def get_converter(name: str) -> Any:
    """The converter registered under `name` ("decoder" or "pairs")."""
    try:
        return CONVERTERS[name]
    except KeyError:
        raise ValueError(f"unknown feature converter {name!r}; known: {', '.join(sorted(CONVERTERS))}") from None


__all__ = ["CONVERTERS", "DECODER", "DecoderConverter", "PAIRS", "PairConverter", "REFERENCE_FEATURE", "get_converter"]
