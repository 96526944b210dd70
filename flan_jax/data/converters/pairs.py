"""The pairs converter: a preference pair as two segments of ONE packed row.

A rendered pair (flan_jax.data.preference) becomes two sequences sharing the prompt,

    chosen half:    [BOS] prompt chosen   -> prompt chosen [EOS]
    rejected half:  [BOS] prompt rejected -> prompt rejected [EOS]

laid out one after the other. Both halves of a pair always sit in the same row, so everything that
splits a batch by whole rows (micro-batching, multi-process row slots, data-parallel shards) keeps
pairs together, and the best-fit packer places a pair as one unit. Each half is its own attention
segment (`segment_ids` 2k-1 and 2k for the k-th pair of a row, positions restarting at 0), so the
halves never see each other. Per position, on top of docs/design.md §4:

  pair_ids       k on both halves of the row's k-th pair, 0 on padding
  response_role  1 where the target token belongs to the chosen response (its EOS included),
                 2 for the rejected response, 0 on prompt tokens and padding

An objective sums per-token log-probabilities by (pair_ids, response_role) to get each response's
log-probability over its response tokens only (flan_jax.train.pairs), and reads a reward model's
score at the last position of each half (whose input is the response's last token). `loss_weights`
equals `response_role > 0`. With a reference cache (DPO's precomputed reference log-probs,
flan_jax.train.reference_cache) every pair also carries `reference_logps`: each response's
reference log-prob at the last position of its half, 0 elsewhere.

Over-long pairs (more than `seq_len` features for both halves) follow `config.data.overlong`:
"truncate" cuts the prompt from the LEFT (the end of a dialogue is what the responses answer),
identically in both halves, and keeps both responses whole; a pair whose responses do not fit
with at least `seq_len // 8` prompt tokens per half (or the whole prompt, if shorter) is dropped:
cutting a response would change what the preference is about. "drop" drops every over-long pair.
Both are counted per task in `FeatureStats` (truncated / dropped) like SFT truncation, and the
first dropped pairs are logged with the file and line they came from.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flan_jax.data import packing
from flan_jax.data.errors import DataError
from flan_jax.data.features import FEATURE_KEYS, FeatureConfig, Outcome
from flan_jax.data.tokenizer import Tokenizer

PAIR_KEYS = ("pair_ids", "response_role")
BATCH_KEYS = packing.BATCH_KEYS + PAIR_KEYS
REFERENCE_FEATURE = "reference_logps"  # with a reference cache: each response's reference log-prob at its last position
CHOSEN, REJECTED = 1, 2  # response_role values (and the local segment of each half)
_LOGGED_DROPS = 3


def _half(prompt: Sequence[int], response: Sequence[int], bos_id: int, eos_id: int, role: int) -> dict[str, np.ndarray]:
    tokens = np.asarray([bos_id, *prompt, *response, eos_id], np.int32)
    length = len(tokens) - 1
    in_response = np.arange(length) >= len(prompt)  # target t is response token (or EOS) t - len(prompt)
    return {
        "input_tokens": tokens[:-1],
        "target_tokens": tokens[1:],
        "loss_weights": in_response.astype(np.float32),
        "prefix_mask": (np.arange(length) <= len(prompt)).astype(np.int32),  # BOS + prompt
        "local_segment": np.full(length, role, np.int32),
        "positions": np.arange(length, dtype=np.int32),
        "response_role": np.where(in_response, role, 0).astype(np.int32),
    }


def build_pair_features(
    prompt_ids: Sequence[int],
    chosen_ids: Sequence[int],
    rejected_ids: Sequence[int],
    *,
    bos_id: int,
    eos_id: int,
    config: FeatureConfig,
) -> tuple[dict[str, np.ndarray] | None, Outcome]:
    """Features of one tokenized pair (both halves concatenated; None when dropped) and what was done."""
    if config.loss_on_inputs:
        raise ValueError("config.data.loss_on_inputs=True does not apply to preference pairs: their log-probs are over response tokens only")
    outcome = Outcome.KEPT
    fixed = 2 + len(chosen_ids) + len(rejected_ids)  # BOS of each half, responses, their EOS shifts
    if fixed + 2 * len(prompt_ids) > config.seq_len:
        if config.overlong == "drop":
            return None, Outcome.DROPPED
        keep = (config.seq_len - fixed) // 2
        if keep < min(len(prompt_ids), config.seq_len // 8):
            return None, Outcome.DROPPED
        prompt_ids = list(prompt_ids)[len(prompt_ids) - keep:]
        outcome = Outcome.TRUNCATED
    chosen = _half(prompt_ids, chosen_ids, bos_id, eos_id, CHOSEN)
    rejected = _half(prompt_ids, rejected_ids, bos_id, eos_id, REJECTED)
    return {key: np.concatenate([chosen[key], rejected[key]]) for key in chosen}, outcome


def build_pair_row(pairs: Sequence[Mapping[str, np.ndarray]], seq_len: int) -> dict[str, np.ndarray]:
    """One row holding `pairs` one after another (segments 2k-1, 2k; pair id k), then padding (all 0)."""
    extra = (REFERENCE_FEATURE,) if pairs and REFERENCE_FEATURE in pairs[0] else ()
    floats = ("loss_weights", *extra)
    row = {key: np.zeros(seq_len, dtype=np.float32 if key in floats else np.int32) for key in (*BATCH_KEYS, *extra)}
    start = 0
    for pair, features in enumerate(pairs, start=1):
        end = start + len(features["input_tokens"])
        if end > seq_len:
            raise ValueError(f"{end} features do not fit in seq_len={seq_len}")
        for key in (*FEATURE_KEYS, "positions", "response_role", *extra):
            row[key][start:end] = features[key]
        row["segment_ids"][start:end] = 2 * (pair - 1) + features["local_segment"]
        row["pair_ids"][start:end] = pair
        start = end
    if extra and np.isnan(row[REFERENCE_FEATURE]).any():
        raise ValueError(
            "a pair of this batch has no cached reference log-probs: the run reads past the steps its reference "
            "cache covers (it is computed for train.num_steps at start; restart the run to extend it)"
        )
    return row


def pair_key(input_tokens: np.ndarray, target_tokens: np.ndarray, local_segment: np.ndarray) -> bytes:
    """A 16-byte digest of one pair's features (both halves, as packed): its key in a reference cache."""
    digest = hashlib.blake2b(digest_size=16)
    for array in (input_tokens, target_tokens, local_segment):
        digest.update(np.ascontiguousarray(array, dtype=np.int32).tobytes())
    return digest.digest()


def reference_feature(features: Mapping[str, np.ndarray], values: tuple[float, float]) -> np.ndarray:
    """The per-token `reference_logps` of one pair: each response's value at the last position of its half."""
    out = np.zeros(len(features["input_tokens"]), np.float32)
    boundary = int(np.argmax(features["local_segment"] == REJECTED))
    out[boundary - 1], out[-1] = values
    return out


class PairConverter:
    """Preference pairs for the reward-model and DPO-family objectives (see the module docstring).

    With `reference` (an object with `lookup(key) -> (chosen, rejected) | None`, e.g.
    flan_jax.train.reference_cache.ReferenceCache), every pair also carries its reference
    log-probs as the per-token feature `reference_logps`; a row holding a pair the cache lacks
    is refused when it is built (never trained on with a made-up reference).
    """

    name = "pairs"

    def __init__(self, reference: Any = None):
        self.reference = reference
        self.batch_keys = BATCH_KEYS + ((REFERENCE_FEATURE,) if reference is not None else ())
        self._drops_logged = 0

    def featurize(
        self, example: Mapping[str, Any], tokenizer: Tokenizer, config: FeatureConfig
    ) -> tuple[dict[str, np.ndarray] | None, Outcome]:
        missing = [key for key in ("inputs", "chosen", "rejected") if key not in example]
        if missing:
            raise DataError(
                f"the pairs converter needs rendered preference pairs (inputs, chosen, rejected); this example has "
                f"no {missing[0]!r}: is the task a data.PreferenceTask?",
                task=example.get("task"), field=missing[0],
            )
        features, outcome = build_pair_features(
            tokenizer.encode(example["inputs"]),
            tokenizer.encode(example["chosen"]),
            tokenizer.encode(example["rejected"]),
            bos_id=tokenizer.bos_id,
            eos_id=tokenizer.eos_id,
            config=config,
        )
        if features is not None and self.reference is not None:
            key = pair_key(features["input_tokens"], features["target_tokens"], features["local_segment"])
            values = self.reference.lookup(key)
            features[REFERENCE_FEATURE] = reference_feature(features, (np.nan, np.nan) if values is None else values)
        if outcome is Outcome.DROPPED and self._drops_logged < _LOGGED_DROPS:
            self._drops_logged += 1
            logging.warning(
                "data: dropped an over-long preference pair of task %r from %s (seq_len %d, overlong %r; counted as dropped)",
                example.get("task"), example.get("origin", "?"), config.seq_len, config.overlong,
            )
        return features, outcome

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        from flan_jax.data.converters.decoder import DECODER

        DECODER.check_tokenizer(tokenizer)  # both halves are decoder segments, each starting with BOS

    def row_shape(self, config: FeatureConfig) -> int:
        return config.seq_len  # one stream: both halves of a pair share the decoder row

    def lengths(self, example: Mapping[str, np.ndarray]) -> int:
        return len(example["input_tokens"])

    def build_row(self, examples: Sequence[Mapping[str, np.ndarray]], row_shape: int) -> dict[str, np.ndarray]:
        return build_pair_row(examples, row_shape)

    def pad_one(self, example: Mapping[str, np.ndarray], row_shape: int) -> dict[str, np.ndarray]:
        if len(example["input_tokens"]) > row_shape:
            raise ValueError(f"a pair of {len(example['input_tokens'])} features does not fit in seq_len={row_shape}")
        return build_pair_row([example], row_shape)

    def __repr__(self) -> str:
        return "PairConverter()" if self.reference is None else "PairConverter(reference=<cache>)"


PAIRS = PairConverter()
