"""Preference pairs generated from the built-in synthetic tasks, so preference tuning needs no files.

Every synthetic example has one verifiably correct answer. Its pair is that answer (chosen) against
a wrong one (rejected), drawn per example with a seeded `random.Random`:

  - for tasks with answer options, another option;
  - otherwise, half of the time a *corrupted* answer (a number off by 1-2, a list with two items
    swapped or one dropped, a phrase missing a word), else the answer of another example of the
    same task and split (a plausible answer to the wrong question).

The prompt is the task's own instruction template, so the pairs are rendered with the same five
training and two held-out wordings as the SFT tasks and split the same way (the validation split
never shares a question with training).

Names:
  synthetic_pairs.<family>                    pairs of one family, training templates
  synthetic_pairs.<family>.heldout_templates  a seen family's pairs with its 2 held-out templates
  synthetic_pairs_train                       seen clusters, training templates (examples-proportional)
  synthetic_pairs_eval_seen                   seen families, training templates, validation split
  synthetic_pairs_eval_seen_heldout_templates seen families, held-out templates, validation split
  synthetic_pairs_eval_heldout_cluster        the held-out cluster's pairs (never trained on)
"""

from __future__ import annotations

import random

from flan_jax import data
from flan_jax.data.preference import PairFields, PreferenceTask
from . import synthetic
from . import synthetic_families as families

PREFIX = "synthetic_pairs."


def corrupt(answer: str, rng: random.Random) -> str | None:
    """A near miss of `answer`, or None when this answer has no obvious one."""
    if answer.isdigit():
        return str(max(int(answer) + rng.choice([-2, -1, 1, 2]), 0))
    items = answer.split(", ")
    if len(items) > 1:
        if len(items) > 2 and rng.random() < 0.5:
            del items[rng.randrange(len(items))]
        else:
            i = rng.randrange(len(items) - 1)
            items[i], items[i + 1] = items[i + 1], items[i]
        return ", ".join(items)
    words = answer.split(" ")
    if len(words) > 1:
        del words[rng.randrange(len(words))]
        return " ".join(words)
    return None


def wrong_answer(record: dict, pool: list[dict], rng: random.Random) -> str:
    """A wrong answer for `record`: another option, a corrupted answer, or another example's answer."""
    answer = record["answer"]
    options = [o for o in record.get("options", ()) if o != answer]
    if options:
        return rng.choice(options)
    corrupted = corrupt(answer, rng) if rng.random() < 0.5 else None
    if corrupted is not None and corrupted != answer:
        return corrupted
    for _ in range(50):
        other = pool[rng.randrange(len(pool))]["answer"]
        if other != answer:
            return other
    corrupted = corrupt(answer, rng)
    if corrupted is None or corrupted == answer:
        raise ValueError(f"no wrong answer found for {record!r}")
    return corrupted


class _PairRecords:
    """The pair records of one (family, split): a picklable no-argument callable for FunctionSource."""

    def __init__(self, family_name: str, split: str):
        self.family_name, self.split = family_name, split
        self.__qualname__ = f"pairs.{family_name}.{split}"  # FunctionSource's repr (compared by grain checkpoints)

    def __call__(self) -> list[dict]:
        pool = synthetic._splits(self.family_name)[self.split]
        out = []
        for index, record in enumerate(pool):
            rng = random.Random(f"{self.family_name}/{self.split}/{index}")
            out.append({**record, "chosen": record["answer"], "rejected": wrong_answer(record, pool, rng)})
        return out


def _templates(pairs: tuple[tuple[str, str], ...], prefix: str) -> list[data.Template]:
    """The family's instruction templates with the answer slot turned into the response slot."""
    return [data.Template(inputs, "{response}", name=f"{prefix}{k}") for k, (inputs, _) in enumerate(pairs)]


def _task(family: families.Family) -> PreferenceTask:
    source = data.FunctionSource({split: _PairRecords(family.name, split) for split in ("train", "validation")})
    train = _templates(family.train_templates, "train")
    heldout_cluster = family.cluster == families.HELDOUT_CLUSTER
    return PreferenceTask(
        PREFIX + family.name,
        source,
        train,
        pair_format=PairFields(prompt=None),  # the templates build the prompt from the family's fields
        options_field="options" if family.has_options else None,
        eval_templates=train + _templates(family.heldout_templates, "heldout") if heldout_cluster else train,
        cluster=family.cluster,
        description=f"synthetic {family.cluster} pairs {family.name!r}: correct answer vs a wrong one (no files)",
    )


def _heldout_templates_task(task: PreferenceTask, family: families.Family) -> PreferenceTask:
    heldout = _templates(family.heldout_templates, "heldout")
    return task.replace(name=task.name + synthetic.HELDOUT_TEMPLATES_SUFFIX, templates=heldout, eval_templates=heldout)


def register() -> None:
    synthetic.register_families(_task, _heldout_templates_task, prefix="synthetic_pairs", what="synthetic preference pairs")

register()
