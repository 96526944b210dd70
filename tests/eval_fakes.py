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


def greedy_bigram_generate(model, prompts, *, max_new_tokens, eos_id, pad_id=0, temperature=0.0, **unused):
    """The contract of flan_jax.model.generate.generate, for BigramModel: argmax of table[last token]."""
    assert temperature == 0.0
    table = np.asarray(model.table[...])
    outputs = []
    for prompt in prompts:
        token, new = prompt[-1], []
        for _ in range(max_new_tokens):
            token = int(table[token].argmax())
            new.append(token)
            if token == eos_id:
                break
        outputs.append(new)
    return outputs


class FakeTask:
    """A registered task as the evaluator sees it (docs/design.md §1-2), with fixed examples."""

    def __init__(self, name, cluster, metrics, splits):
        self.name, self.cluster, self.metrics, self._splits = name, cluster, list(metrics), splits
        self.splits = tuple(splits)
        self.calls = []

    def get_dataset(self, split, *, seed=0, shuffle=True, template_set="train", num_shots=0):
        self.calls.append({"split": split, "shuffle": shuffle, "template_set": template_set, "num_shots": num_shots})
        return [
            {"task": self.name, "references": [ex["targets"]], "options": [], **ex,
             "inputs": "example. " * num_shots + ex["inputs"]}
            for ex in self._splits[split]
        ]


class FakeMixture:
    def __init__(self, name, tasks):
        self.name, self.tasks = name, tasks
