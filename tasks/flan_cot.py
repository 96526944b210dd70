"""FLAN chain-of-thought tasks (`<data_dir>/flan_cot/`) and GSM8K (`<data_dir>/gsm8k/`).

The FLAN CoT TSVs hold `question<TAB>answer<TAB>rationale` with newlines written as the two
characters backslash-n; they are decoded before templating. Each of the 7 files gives two tasks:

  flan_cot.<name>               question + a reasoning trigger ("Let's think step by step.")
                                -> "<rationale> So the answer is <answer>."; scored by exact match on
                                the answer read after "So the answer is" (data.AnswerAfter), and loss
  flan_cot.<name>.answer_only   the same questions -> the bare answer (with answer options for
                                rank classification where the question lists them, or yes/no)

The TSVs are training data only; every 10th record is carved out as a validation split.

GSM8K keeps its own splits (train for training, test for evaluation):
  gsm8k               question + trigger -> worked solution + "So the answer is N."; references = N
  gsm8k.answer_only   question -> N
Both are scored with "gsm8k_accuracy" (the final number of the generation against N).

Mixtures: flan_cot (CoT + answer-only of the 6 non-GSM8K TSVs, plus gsm8k), capped.
"""

from __future__ import annotations

from flan_jax import data
from . import preprocessors

NAMES = ("aqua", "creak", "ecqa", "gsm8k", "qasc", "sensemaking", "strategyqa")
# Every TSV but gsm8k lists answer options in its question (or answers yes/no).
WITH_OPTIONS = ("aqua", "creak", "ecqa", "qasc", "sensemaking", "strategyqa")
COLUMNS = ("question", "answer", "rationale")
VALIDATION_EVERY = 10
CAP_PER_TASK = 5_000

# FLAN-style question wordings; `data.cot_templates` pairs them with its reasoning triggers.
QUESTION_PATTERNS = (
    "{question}",
    "Question: {question}",
    "Answer the following question.\n{question}",
    "Q: {question}",
    "Here is a question: {question}\nWhat is the answer?",
)


def _cot_source(name: str) -> data.Source:
    tsv = data.TsvSource({"train": f"{{data_dir}}/flan_cot/{name}_train.tsv"}, columns=COLUMNS)
    return data.CarvedSplits(tsv, every=VALIDATION_EVERY)


def _cot_tasks(name: str) -> tuple[data.Task, data.Task]:
    with_options = name in WITH_OPTIONS
    steps = [data.UnescapeNewlines(*COLUMNS), preprocessors.repair_mojibake(*COLUMNS)]
    steps += [preprocessors.add_cot_options] if with_options else []
    source = _cot_source(name)
    cot = data.Task(
        f"flan_cot.{name}", source, data.cot_templates(QUESTION_PATTERNS),
        preprocessors=steps,
        # The rationale is free text: the templates' answer extractor reads what follows "So the answer
        # is", which exact match (or, for GSM8K, the number comparison) scores against `answer`.
        metrics=("gsm8k_accuracy",) if name == "gsm8k" else ("exact_match", "loss"),
        references_field="answer",
        cluster="chain_of_thought",
        description=f"FLAN CoT {name}: question -> rationale + 'So the answer is ...'",
    )
    answer_only = data.Task(
        f"flan_cot.{name}.answer_only", source, data.answer_only_templates(QUESTION_PATTERNS),
        preprocessors=steps,
        metrics=("exact_match", "rank_classification") if with_options else ("exact_match",),
        options_field="options" if with_options else None,
        cluster="chain_of_thought_answer_only",
        description=f"FLAN CoT {name} without the rationale: question -> answer",
    )
    return cot, answer_only


def _gsm8k_tasks() -> tuple[data.Task, data.Task]:
    source = data.JsonlSource({split: f"{{data_dir}}/gsm8k/{split}.jsonl" for split in ("train", "test")})
    common = dict(preprocessors=[preprocessors.split_gsm8k_answer], metrics=("gsm8k_accuracy",),
                  references_field="number", cluster="math")
    cot = data.Task(
        "gsm8k", source, data.cot_templates(QUESTION_PATTERNS, targets="{rationale} So the answer is {number}."),
        description="GSM8K: question -> worked solution + 'So the answer is N.'", **common)
    answer_only = data.Task(
        "gsm8k.answer_only", source, data.answer_only_templates(QUESTION_PATTERNS, targets="{number}"),
        description="GSM8K: question -> N", **common)
    return cot, answer_only


def register() -> None:
    submix = []
    for name in NAMES:
        cot, answer_only = _cot_tasks(name)
        data.register_task(cot)
        data.register_task(answer_only)
        if name != "gsm8k":  # the `gsm8k` task below has the same training questions
            submix += [cot.name, answer_only.name]
    for task in _gsm8k_tasks():
        data.register_task(task)
    data.register_mixture(data.Mixture.proportional(
        "flan_cot", submix + ["gsm8k"], cap=CAP_PER_TASK,
        description="FLAN CoT tasks (with and without rationale) + GSM8K, examples-proportional with a cap"))


register()
