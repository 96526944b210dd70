"""P3/T0 tasks from `<data_dir>/t0/`: one task per file (= dataset x prompt template), in 8 clusters.

The files are already rendered by the P3 templates, so a task's own template is just
`{prompt}` -> `{completion}`, with the `<|endoftext|>` end marker stripped from completions.
Each file's records are split into train and validation (every 10th record, `data.CarvedSplits`).

Names:
  t0.<dataset>.<template>      one task per file (294; the 18 unusable TREC ones are in no mixture)
  t0_<cluster>                 examples-proportional mixture of a cluster's non-empty tasks
  t0                           all clusters
  t0_minus_<cluster>           all clusters but one: FLAN's leave-one-cluster-out training mixture

The 11 zero-byte `trec_fine_grained_*` files are registered, read as empty with a warning
(`source.empty_files` lists them) and left out of every mixture; the 7 other TREC files hold only
empty completions, which the tasks drop (counted in `task.filtered`, logged), and are left out
too. `check_files()` reports both kinds.
"""

from __future__ import annotations

import json
import logging
import pathlib

from flan_jax import data
from . import preprocessors
from . import t0_catalog as catalog

logger = logging.getLogger(__name__)
END_OF_TEXT = "<|endoftext|>"
# T0 capped each dataset at 500k examples; a task here is one template of a dataset (~10 per dataset).
CAP_PER_TASK = 50_000
VALIDATION_EVERY = 10
# Clusters whose targets are free text get ROUGE-L; the rest also get exact match.
FREE_TEXT_CLUSTERS = ("summarization", "structure_to_text")
TEMPLATE = data.Template("{prompt}", "{completion}", name="p3")


def task_name(dataset: str, template: str) -> str:
    return f"t0.{dataset}.{template}"


def _task(dataset: str, template: str) -> data.Task:
    cluster = catalog.CLUSTER_OF_DATASET[dataset]
    source = data.JsonlSource({"train": f"{{data_dir}}/t0/{dataset}_{template}.jsonl"}, on_empty="warn")
    return data.Task(
        task_name(dataset, template),
        data.CarvedSplits(source, every=VALIDATION_EVERY),
        [TEMPLATE],
        preprocessors=[data.StripSuffix(END_OF_TEXT, "completion"), preprocessors.DropEmpty("completion")],
        metrics=("rouge_l",) if cluster in FREE_TEXT_CLUSTERS else ("exact_match", "rouge_l"),
        cluster=cluster,
        description=f"P3 {dataset} rendered with the prompt template {template!r}",
    )


def tasks_of_cluster(cluster: str, *, include_empty: bool = False) -> list[str]:
    """Task names of a cluster (without the known-unusable files unless asked)."""
    if cluster not in catalog.CLUSTERS:
        raise data.DataError(f"unknown T0 cluster {cluster!r}; clusters: {', '.join(catalog.CLUSTERS)}")
    return [
        task_name(dataset, template)
        for dataset in catalog.CLUSTERS[cluster]
        for template in catalog.TEMPLATES[dataset]
        if include_empty or f"{dataset}_{template}" not in catalog.UNUSABLE_FILES
    ]


def check_files(data_dir: str | pathlib.Path | None = None) -> dict:
    """Compares the folder with the catalog: records per file, empty files, missing and unexpected files.

    Returns {"records": {stem: n}, "empty": [...], "empty_completions": [...], "single_answer": [...],
    "missing": [...], "unexpected": [...]} and logs a warning for each kind that is not empty
    (nothing is skipped silently). "empty_completions": every completion is empty (unusable);
    "single_answer": every record has the same completion (the subset took the first records of
    label-sorted datasets: all of imdb is negative, all of rotten_tomatoes positive, all of dbpedia
    "Company"), so exact match on those tasks rewards a constant answer.
    """
    folder = pathlib.Path(data_dir) if data_dir is not None else data.data_dir()
    folder = folder / "t0"
    expected = set(catalog.file_stems())
    present = {path.stem: path for path in folder.glob("*.jsonl")}
    report = {"records": {}, "empty": [], "empty_completions": [], "single_answer": [],
              "missing": sorted(expected - set(present)), "unexpected": sorted(set(present) - expected)}
    for stem in sorted(present):
        with open(present[stem], "rb") as f:
            completions = [_completion(line) for line in f if line.strip()]
        report["records"][stem] = len(completions)
        if not completions:
            report["empty"].append(stem)
        elif not any(completions):
            report["empty_completions"].append(stem)
        elif len(set(completions)) == 1 and len(completions) > 1:
            report["single_answer"].append(stem)
    for kind in ("empty", "empty_completions", "single_answer", "missing", "unexpected"):
        if report[kind]:
            logger.warning("t0: %d %s file(s): %s", len(report[kind]), kind, ", ".join(report[kind]))
    return report


def _completion(line: bytes) -> str:
    return str(json.loads(line).get("completion", "")).removesuffix(END_OF_TEXT).strip()


def register() -> None:
    for dataset, templates in catalog.TEMPLATES.items():
        for template in templates:
            data.register_task(_task(dataset, template))
    for cluster in catalog.CLUSTERS:
        data.register_mixture(data.Mixture.proportional(
            f"t0_{cluster}", tasks_of_cluster(cluster), cap=CAP_PER_TASK,
            description=f"T0 cluster {cluster!r}, examples-proportional"))
    all_tasks = [name for cluster in catalog.CLUSTERS for name in tasks_of_cluster(cluster)]
    data.register_mixture(data.Mixture.proportional(
        "t0", all_tasks, cap=CAP_PER_TASK, description="all 8 T0 clusters, examples-proportional with a cap"))
    for held_out in catalog.CLUSTERS:
        kept = [name for cluster in catalog.CLUSTERS if cluster != held_out for name in tasks_of_cluster(cluster)]
        data.register_mixture(data.Mixture.proportional(
            f"t0_minus_{held_out}", kept, cap=CAP_PER_TASK,
            description=f"T0 without the {held_out!r} cluster (leave-one-cluster-out training)"))


register()
