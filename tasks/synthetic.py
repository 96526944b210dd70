"""Registers the built-in synthetic FLAN-style mixture (families in `tasks/synthetic_families.py`).

Names (used by `configs/demo.py`):
  synthetic.<family>                      one task per family, training templates
  synthetic.<family>.heldout_templates    a seen family rendered only with its 2 held-out templates
  synthetic_train                         seen clusters, training templates (examples-proportional)
  synthetic_eval_seen                     seen tasks, training templates, validation split
  synthetic_eval_seen_heldout_templates   seen tasks, held-out templates, validation split
  synthetic_eval_heldout_cluster          the held-out cluster's tasks (never trained on)

Evaluation reads the validation split, which never shares a question with the train split.
"""

from __future__ import annotations

import functools

from flan_jax import data
from . import synthetic_families as families

NUM_TRAIN = 2000
NUM_VALIDATION = 100
PREFIX = "synthetic."
HELDOUT_TEMPLATES_SUFFIX = ".heldout_templates"


@functools.lru_cache(maxsize=None)
def _splits(family_name: str) -> dict[str, list[dict]]:
    family = next(f for f in families.FAMILIES if f.name == family_name)
    return families.generate_splits(family, NUM_TRAIN, NUM_VALIDATION, seed=0)


class _SplitRecords:
    """The records of one (family, split): a picklable no-argument callable for FunctionSource
    (grain worker processes pickle tasks). Its `__qualname__` names the family and split, since
    FunctionSource's repr, which grain checkpoints compare, is built from it."""

    def __init__(self, family_name: str, split: str):
        self.family_name, self.split = family_name, split
        self.__qualname__ = f"{family_name}.{split}"  # repr: flan_jax_tasks.synthetic.<family>.<split>

    def __call__(self) -> list[dict]:
        return [dict(record) for record in _splits(self.family_name)[self.split]]


def _templates(pairs: tuple[tuple[str, str], ...], prefix: str) -> list[data.Template]:
    return [data.Template(inputs, targets, name=f"{prefix}{k}") for k, (inputs, targets) in enumerate(pairs)]


def _task(family: families.Family) -> data.Task:
    source = data.FunctionSource({split: _SplitRecords(family.name, split) for split in ("train", "validation")})
    train = _templates(family.train_templates, "train")
    heldout_cluster = family.cluster == families.HELDOUT_CLUSTER
    return data.Task(
        PREFIX + family.name,
        source,
        train,
        # A held-out cluster is never trained on, so its evaluation may use all seven wordings.
        eval_templates=train + _templates(family.heldout_templates, "heldout") if heldout_cluster else train,
        # Tasks with answer options are also scored FLAN/T0's way, by ranking the options.
        metrics=("exact_match", "rank_classification") if family.has_options else ("exact_match",),
        cluster=family.cluster,
        options_field="options" if family.has_options else None,
        description=f"synthetic {family.cluster} task {family.name!r} (generated in code, no files)",
    )


def _heldout_templates_task(task: data.Task, family: families.Family) -> data.Task:
    heldout = _templates(family.heldout_templates, "heldout")
    return task.replace(name=task.name + HELDOUT_TEMPLATES_SUFFIX, templates=heldout, eval_templates=heldout)


def register() -> None:
    seen, heldout_templates, heldout_cluster = [], [], []
    for family in families.FAMILIES:
        task = data.register_task(_task(family))
        if family.cluster == families.HELDOUT_CLUSTER:
            heldout_cluster.append(task.name)
            continue
        seen.append(task.name)
        heldout_templates.append(data.register_task(_heldout_templates_task(task, family)).name)
    data.register_mixture(data.Mixture.proportional(
        "synthetic_train", seen, description="synthetic seen clusters, training templates"))
    data.register_mixture(data.Mixture.proportional(
        "synthetic_eval_seen", seen, split="validation",
        description="seen synthetic tasks with their training templates (validation split)"))
    data.register_mixture(data.Mixture.proportional(
        "synthetic_eval_seen_heldout_templates", heldout_templates, split="validation",
        description="seen synthetic tasks rendered with held-out templates (validation split)"))
    data.register_mixture(data.Mixture.proportional(
        "synthetic_eval_heldout_cluster", heldout_cluster, split="validation",
        description=f"the held-out {families.HELDOUT_CLUSTER!r} cluster, never in synthetic_train"))


register()
