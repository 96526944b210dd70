"""Fakes shared by the tokenizer / features / packing / loader tests: rendered examples and a tiny tokenizer."""

from __future__ import annotations

import functools
import random

import grain
import ml_collections

from flan_jax import default_config
from flan_jax.data import tokenizer as tokenizer_lib

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma tau "
    "upsilon phi chi psi omega the a of to and is in question answer context"
).split()


def fake_examples(
    n: int,
    *,
    seed: int = 0,
    tasks: tuple[str, ...] = ("task_a", "task_b", "task_c"),
    max_input_words: int = 60,
    max_target_words: int = 20,
) -> list[dict]:
    """`n` rendered examples (docs/design.md §1) of varied lengths; example i's inputs start with `#i:`."""
    rng = random.Random(seed)
    examples = []
    for i in range(n):
        inputs = f"#{i}: " + " ".join(rng.choices(WORDS, k=rng.randint(1, max_input_words))) + "\nAnswer:"
        targets = " " + " ".join(rng.choices(WORDS, k=rng.randint(1, max_target_words)))
        examples.append(
            {"inputs": inputs, "targets": targets, "task": tasks[i % len(tasks)], "references": [targets], "options": []}
        )
    return examples


@functools.lru_cache(maxsize=None)
def _tiny_model_bytes() -> bytes:
    texts = []
    for example in fake_examples(300, seed=123):
        texts += [example["inputs"], example["targets"]]
    return tokenizer_lib.train_sentencepiece(texts, vocab_size=400)


def tiny_tokenizer() -> tokenizer_lib.SentencePieceTokenizer:
    """A ~400-piece sentencepiece model trained on fake examples (trained once per test session)."""
    return tokenizer_lib.SentencePieceTokenizer(_tiny_model_bytes(), name="tiny")


def data_config(**overrides) -> ml_collections.ConfigDict:
    """`config.data` with small defaults for tests, plus `overrides`."""
    config = default_config.get_config().data
    config.seq_len = 64
    config.batch_size = 4
    config.num_packing_bins = 8
    for key, value in overrides.items():
        setattr(config, key, value)
    return config


def example_source(examples: list[dict], *, shuffle_seed: int | None = None) -> grain.MapDataset:
    dataset = grain.MapDataset.source(examples)
    return dataset if shuffle_seed is None else dataset.shuffle(seed=shuffle_seed)


def register_fake_tasks(prefix: str, sizes: dict[str, int], *, long_every: dict[str, int] | None = None):
    """Registers tasks `prefix + name` of `size` records (plus a proportional mixture `prefix + "mix"`).

    Record i of a task renders to inputs "#i: <words>\\nAnswer:" and targets " <words>"; with
    `long_every={name: k}`, every k-th record of that task has a long instruction (for truncation counts).
    Returns the registered names; pass them to `unregister_all` when done.
    """
    from flan_jax import data

    names = []
    for offset, (name, size) in enumerate(sorted(sizes.items())):
        rng = random.Random(offset)
        every = (long_every or {}).get(name, 0)
        records = []
        for i in range(size):
            words = rng.randint(1, 20) + (200 if every and i % every == 0 else 0)
            records.append(
                {
                    "id": str(i),
                    "question": " ".join(rng.choices(WORDS, k=words)),
                    "answer": " ".join(rng.choices(WORDS, k=rng.randint(1, 8))),
                }
            )
        task = data.Task(
            prefix + name,
            data.InMemorySource({"train": records}),
            [("#{id}: {question}\nAnswer:", " {answer}"), ("#{id}: Q: {question}\nA:", " {answer}")],
        )
        data.register_task(task, replace=True)
        names.append(task.name)
    data.register_mixture(data.Mixture.proportional(prefix + "mix", names), replace=True)
    return names + [prefix + "mix"]


def unregister_all(names) -> None:
    from flan_jax import data

    for name in names:
        data.unregister(name)
