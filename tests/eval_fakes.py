"""Tiny stand-ins for the evaluation tests: a character tokenizer and models whose outputs we set.

With `BigramModel`, the next-token distribution depends only on the current token
(logits = table[token]), so every log-likelihood can be computed by hand in numpy and the
model's preferences between answer options are known in advance. `ScriptedGenerate` is a
`generate_fn` whose greedy generations are written by the test ("... So the answer is (B).").
"""

from __future__ import annotations

import string

import jax.numpy as jnp
import numpy as np
from flax import nnx

PAD, UNK, BOS, EOS = 0, 1, 2, 3
_CHARS = string.ascii_lowercase + string.digits + " .,:?!-+=\n"
CASED_CHARS = string.ascii_letters + string.digits + " .,:;?!-+=()'\n"


class CharTokenizer:
    """One id per character (ids 0-3 are PAD, UNK, BOS, EOS), the design.md §3 interface.

    The default lowercases and knows few characters; `CharTokenizer(CASED_CHARS, lowercase=False)`
    round-trips "So the answer is (B)." exactly.
    """

    pad_id, bos_id, eos_id = PAD, BOS, EOS

    def __init__(self, chars: str = _CHARS, *, lowercase: bool = True):
        self.chars, self.lowercase = chars, lowercase
        self._ids = {c: 4 + i for i, c in enumerate(chars)}
        self.vocab_size = 4 + len(chars)

    def encode(self, text: str) -> list[int]:
        return [self._ids.get(c, UNK) for c in (text.lower() if self.lowercase else text)]

    def encode_batch(self, texts):
        return [self.encode(t) for t in texts]

    def decode(self, ids) -> str:
        return "".join(self.chars[i - 4] for i in ids if i >= 4)


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


class ScriptedGenerate:
    """A `generate_fn` (flan_jax.model.generate.generate's contract) whose outputs the test writes.

    `respond(prompt_text) -> generation` sees the decoded prompt (as cut to fit) and answers; the
    answer is encoded, cut to max_new_tokens and ended with EOS when it fits. `prompts` keeps every
    decoded prompt, in call order.
    """

    def __init__(self, tokenizer, respond):
        self.tokenizer, self.respond = tokenizer, respond
        self.prompts: list[str] = []

    def __call__(self, model, prompts, *, max_new_tokens, eos_id, pad_id=0, temperature=0.0, **unused):
        assert temperature == 0.0
        outputs = []
        for ids in prompts:
            text = self.tokenizer.decode([i for i in ids if i != pad_id])
            self.prompts.append(text)
            new = self.tokenizer.encode(self.respond(text))[:max_new_tokens]
            outputs.append(new + [eos_id] if len(new) < max_new_tokens else new)
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
