"""Tiny stand-ins for the evaluation tests: a character tokenizer and a model whose logits we set.

With `BigramModel`, the next-token distribution depends only on the current token
(logits = table[token]), so every log-likelihood can be computed by hand in numpy and the
model's preferences between answer options are known in advance.
"""

from __future__ import annotations

import string

import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD, UNK, BOS, EOS = 0, 1, 2, 3
_CHARS = string.ascii_lowercase + string.digits + " .,:?!-+=\n"


class CharTokenizer:
    """One id per character (ids 0-3 are PAD, UNK, BOS, EOS), the design.md §3 interface."""

    pad_id, bos_id, eos_id = PAD, BOS, EOS
    vocab_size = 4 + len(_CHARS)

    def encode(self, text: str) -> list[int]:
        return [4 + _CHARS.index(c) if c in _CHARS else UNK for c in text.lower()]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(_CHARS[i - 4] for i in ids if i >= 4)


class BigramModel(nnx.Module):
    """logits[b, t] = table[input_tokens[b, t]]: preferences fully controlled by `table`."""

    def __init__(self, table: np.ndarray):
        self.table = nnx.Param(jnp.asarray(table, jnp.float32))

    def __call__(self, input_tokens, *, positions=None, segment_ids=None, prefix_mask=None):
        return self.table[...][input_tokens]


def log_softmax(row: np.ndarray) -> np.ndarray:
    row = row.astype(np.float64)
    return row - np.log(np.exp(row - row.max()).sum()) - row.max()


def bigram_log_likelihood(table: np.ndarray, prompt: list[int], target: list[int]) -> float:
    """Sum of log p(target_i | previous token), computed independently of flan_jax."""
    tokens = prompt + target
    return float(sum(log_softmax(table[tokens[i - 1]])[tokens[i]] for i in range(len(prompt), len(tokens))))
