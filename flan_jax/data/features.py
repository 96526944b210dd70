"""Rendered example -> token features for a decoder-only model, with a counted over-long policy.

An example becomes `tokens = [BOS] + encode(inputs) + encode(targets) + [EOS]` and then the shifted pair
`input_tokens = tokens[:-1]`, `target_tokens = tokens[1:]` (docs/design.md §4). Per position:

  loss_weights  1 where the *target* token is part of the response (targets and EOS), else 0;
                1 everywhere with `loss_on_inputs`.
  prefix_mask   1 on BOS + instruction tokens (the part a prefix-LM attends to bidirectionally).

Over-long examples (more than `seq_len` features) follow `overlong`:

  "drop"      the example is skipped (and counted).
  "truncate"  the response is kept whole and the *middle* of the instruction is cut: its first and last
              halves survive. FLAN/T0 prompts put the task description at the start and the question or
              answer cue ("Answer:", "The sentiment is") at the end; cutting the middle keeps both.
              The instruction always keeps at least a quarter of the row (or all of itself when shorter),
              so a response is never trained on without its prompt; a response longer than the rest is cut
              at its end and then gets no EOS (the model must not learn to stop mid-answer).

Every truncation and drop is counted per task in `FeatureStats`, which the loader logs and checkpoints
and `python -m flan_jax.inspect_mixture` reports.
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flan_jax.data import chat_features
from flan_jax.data.tokenizer import Tokenizer

FEATURE_KEYS = ("input_tokens", "target_tokens", "loss_weights", "prefix_mask")
FEATURE_DTYPES = {
    "input_tokens": np.int32,
    "target_tokens": np.int32,
    "loss_weights": np.float32,
    "prefix_mask": np.int32,
}
OVERLONG_POLICIES = ("truncate", "drop")


class Outcome(str, enum.Enum):
    """What happened to one example on its way to features."""

    KEPT = "kept"
    TRUNCATED = "truncated"  # instruction cut (response whole)
    RESPONSE_TRUNCATED = "response_truncated"  # the response itself was cut too
    DROPPED = "dropped"


@dataclasses.dataclass(frozen=True)
class FeatureConfig:
    seq_len: int
    loss_on_inputs: bool = False
    overlong: str = "truncate"
    targets_len: int = 0  # encoder-decoder rows only: the decoder length (0: seq_len); see converters/encdec.py

    def __post_init__(self):
        if self.overlong not in OVERLONG_POLICIES:
            raise ValueError(f"config.data.overlong={self.overlong!r}: expected one of {OVERLONG_POLICIES}")
        if self.seq_len < 8:
            raise ValueError(f"config.data.seq_len={self.seq_len} is too short to hold an example")

    @classmethod
    def from_data_config(cls, data_config: Any) -> FeatureConfig:
        return cls(
            seq_len=int(data_config.seq_len),
            loss_on_inputs=bool(data_config.loss_on_inputs),
            overlong=str(data_config.overlong),
            targets_len=int(data_config.get("targets_len", 0) or 0),
        )


def cut_middle(ids: Sequence[int], keep: int) -> Sequence[int]:
    """The first `keep // 2` and the last `keep - keep // 2` ids."""
    if keep >= len(ids):
        return ids
    head = keep // 2
    tail = keep - head
    return list(ids[:head]) + (list(ids[len(ids) - tail :]) if tail else [])


def build_features(
    input_ids: Sequence[int],
    target_ids: Sequence[int],
    *,
    bos_id: int | None,
    eos_id: int | None,
    config: FeatureConfig,
    target_mask: Sequence[int] | None = None,
) -> tuple[dict[str, np.ndarray] | None, Outcome]:
    """Features of one tokenized example (None when dropped) and what was done to fit it.

    `bos_id` / `eos_id` None: no BOS / EOS is added (a chat template writes its own markers).
    `target_mask` (one 0/1 per target id): which targets the loss is on (chat: assistant turns);
    default all of them.
    """
    start = [] if bos_id is None else [bos_id]
    end = [] if eos_id is None else [eos_id]
    if target_mask is not None and len(target_mask) != len(target_ids):
        raise ValueError(f"target_mask has {len(target_mask)} entries for {len(target_ids)} target ids")
    budget = config.seq_len + 1 - len(start) - len(end)  # ids that fit beside BOS / EOS
    outcome = Outcome.KEPT
    if len(input_ids) + len(target_ids) > budget:
        if config.overlong == "drop":
            return None, Outcome.DROPPED
        min_inputs = min(len(input_ids), budget // 4)
        if len(target_ids) <= budget - min_inputs:
            outcome = Outcome.TRUNCATED
            keep_inputs = budget - len(target_ids)
        else:  # without EOS, instruction + response may fill all seq_len features
            outcome = Outcome.RESPONSE_TRUNCATED
            keep_inputs = min_inputs
            keep_targets = config.seq_len + 1 - len(start) - min_inputs
            target_ids = target_ids[:keep_targets]
            target_mask = None if target_mask is None else target_mask[:keep_targets]
            end = []
        input_ids = cut_middle(input_ids, keep_inputs)

    num_inputs = len(input_ids)
    tokens = np.asarray([*start, *input_ids, *target_ids, *end], dtype=np.int32)
    length = len(tokens) - 1
    first_target = len(start) + num_inputs  # token index of the first target id
    # Position t predicts token t + 1, so weights[k] (for token k) moves to position k - 1.
    weights = np.zeros(len(tokens), dtype=np.float32)
    weights[first_target:first_target + len(target_ids)] = 1.0 if target_mask is None else np.asarray(target_mask, np.float32)
    weights[first_target + len(target_ids):] = 1.0  # EOS
    loss_weights = np.ones(length, np.float32) if config.loss_on_inputs else weights[1:]
    prefix_mask = np.zeros(length, dtype=np.int32)
    prefix_mask[:first_target] = 1  # BOS + instruction
    features = {
        "input_tokens": tokens[:-1],
        "target_tokens": tokens[1:],
        "loss_weights": loss_weights,
        "prefix_mask": prefix_mask,
    }
    return features, outcome


def featurize(
    example: Mapping[str, Any], tokenizer: Tokenizer, config: FeatureConfig
) -> tuple[dict[str, np.ndarray] | None, Outcome]:
    """Tokenizes a rendered example (docs/design.md §1) and builds its features.

    A chat example (one with `messages`, or any example when `tokenizer.chat_prompts`) is rendered
    with the tokenizer's chat template and trained on its assistant turns (chat_features.py).
    """
    messages = chat_features.conversation_of(example, tokenizer)
    if messages is not None:
        ids, mask = chat_features.assistant_token_mask(messages, tokenizer, task=example.get("task", ""))
        first = mask.index(1)
        return build_features(ids[:first], ids[first:], bos_id=None, eos_id=None, config=config,
                              target_mask=mask[first:])
    input_ids = tokenizer.encode(example["inputs"])
    target_ids = tokenizer.encode(example["targets"])
    start = chat_features.start_ids(tokenizer)
    return build_features(input_ids, target_ids, bos_id=start[0] if start else None, eos_id=tokenizer.eos_id,
                          config=config)


@dataclasses.dataclass
class TaskCounts:
    examples: int = 0  # examples seen (kept, truncated or dropped)
    tokens: int = 0  # features kept (after truncation)
    truncated: int = 0  # instruction cut, response whole
    response_truncated: int = 0  # response cut too
    dropped: int = 0

    @property
    def overlong(self) -> int:
        return self.truncated + self.response_truncated + self.dropped


class FeatureStats:
    """Per-task counts of examples, kept tokens, truncations and drops. JSON-friendly for checkpoints.

    Counts are kept as immutable tuples per task, so `snapshot()` is a shallow dict copy: the packer
    asks for its parent's state before every example, and a mixture can have hundreds of tasks.
    """

    _FIELDS = tuple(field.name for field in dataclasses.fields(TaskCounts))

    def __init__(self):
        self._counts: dict[str, tuple[int, ...]] = {}

    def add(self, task: str, outcome: Outcome, num_tokens: int) -> None:
        examples, tokens, truncated, response_truncated, dropped = self._counts.get(task, (0, 0, 0, 0, 0))
        self._counts[task] = (
            examples + 1,
            tokens + num_tokens,
            truncated + (outcome is Outcome.TRUNCATED),
            response_truncated + (outcome is Outcome.RESPONSE_TRUNCATED),
            dropped + (outcome is Outcome.DROPPED),
        )

    @property
    def by_task(self) -> dict[str, TaskCounts]:
        return {task: TaskCounts(*counts) for task, counts in sorted(self._counts.items())}

    def total(self) -> TaskCounts:
        sums = [sum(column) for column in zip(*self._counts.values())] or [0] * len(self._FIELDS)
        return TaskCounts(*sums)

    def merge(self, other: FeatureStats) -> None:
        for task, counts in other._counts.items():
            mine = self._counts.get(task, (0,) * len(self._FIELDS))
            self._counts[task] = tuple(a + b for a, b in zip(mine, counts))

    def snapshot(self) -> dict[str, tuple[int, ...]]:
        """The counts as {task: (examples, tokens, truncated, response_truncated, dropped)} (cheap)."""
        return dict(self._counts)

    def restore(self, snapshot: Mapping[str, Sequence[int]]) -> None:
        """Inverse of `snapshot` (also accepts the lists JSON turns the tuples into)."""
        self._counts = {task: tuple(int(n) for n in counts) for task, counts in snapshot.items()}

    def to_dict(self) -> dict[str, dict[str, int]]:
        """{task: {field: count}} for reports and logs."""
        return {task: dataclasses.asdict(counts) for task, counts in self.by_task.items()}

    def summary(self) -> str:
        total = self.total()
        return (
            f"{total.examples:,} examples: {total.truncated:,} instruction-truncated, "
            f"{total.response_truncated:,} response-truncated, {total.dropped:,} dropped"
        )
