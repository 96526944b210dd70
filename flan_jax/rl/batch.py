"""The update layout of a rollout: one completion per row, `[BOS] prompt completion` from position 0.

    input_tokens     the sequence without its last token (right-padded with 0)
    target_tokens    the sequence without its first token
    positions        0, 1, ... (the prompt was generated from position 0 too)
    segment_ids      1 on the sequence, 0 on padding
    completion_mask  1.0 where the target is a completion token (EOS included when generated)

Rows of one prompt's group are adjacent (row = prompt * G + g), so group statistics are reshapes.
Per-token quantities of the rollout (old and reference log-probs, values, advantages, returns)
are aligned with `target_tokens`. A row holds at most `seq_len` positions: the prompt budget
(`data.seq_len - rl.max_new_tokens`, BOS included) plus the completion fit by construction.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

LAYOUT_KEYS = ("input_tokens", "target_tokens", "positions", "segment_ids", "completion_mask")


def build_rows(prompts: Sequence[Sequence[int]], completions: Sequence[Sequence[int]], seq_len: int) -> dict[str, np.ndarray]:
    """The layout above for `prompts[i] + completions[i]` (completion tokens with EOS when it ended)."""
    if len(prompts) != len(completions):
        raise ValueError(f"{len(prompts)} prompts for {len(completions)} completions")
    rows = len(prompts)
    out = {
        "input_tokens": np.zeros((rows, seq_len), np.int32),
        "target_tokens": np.zeros((rows, seq_len), np.int32),
        "positions": np.zeros((rows, seq_len), np.int32),
        "segment_ids": np.zeros((rows, seq_len), np.int32),
        "completion_mask": np.zeros((rows, seq_len), np.float32),
    }
    for r, (prompt, completion) in enumerate(zip(prompts, completions)):
        sequence = [*prompt, *completion]
        n = len(sequence) - 1
        if n > seq_len:
            raise ValueError(f"row {r}: prompt ({len(prompt)}) + completion ({len(completion)}) tokens exceed seq_len + 1 = {seq_len + 1}")
        out["input_tokens"][r, :n] = sequence[:-1]
        out["target_tokens"][r, :n] = sequence[1:]
        out["positions"][r, :n] = np.arange(n)
        out["segment_ids"][r, :n] = 1
        out["completion_mask"][r, len(prompt) - 1:n] = 1.0
    return out
