"""Text metrics for generated answers, defined exactly as the benchmarks' official scorers define them.

Every metric here scores ONE prediction against a list of acceptable references and returns a
number in [0, 1]; the evaluator averages them over a task and reports x100. Tasks name their
metrics in `task.metrics`; `GENERATION_METRICS` maps those names to the functions here.
Rank classification and loss need the model, not just text: they live in `flan_jax.eval.scoring`.

Official definitions followed (so our numbers compare with published ones):

* exact match and ROUGE-L: the Super-NaturalInstructions scorer,
  https://github.com/allenai/natural-instructions/blob/master/eval/automatic/evaluation.py
  Its `normalize_answer` is SQuAD v1.1's *without removing the articles* (the scorer says so
  in a comment): lowercase, drop every `string.punctuation` character, collapse whitespace.
  Its ROUGE-L is `rouge_scorer.RougeScorer(['rougeL'], use_stemmer=True)` on the raw strings
  (the rouge-score default tokenizer lowercases, splits on non-[a-z0-9], Porter-stems words longer
  than 3 characters), F-measure, max over references. SNI's "xlingual" track swaps in a GPT-2
  tokenizer, which would need a download; we implement the default (English) track only.
  SQuAD's own article removal is available as `normalize_answer(..., remove_articles=True)`.
* GSM8K: the final number of the answer (see `extract_final_number`), compared numerically.
"""

from __future__ import annotations

import functools
import math
import re
import string
from collections.abc import Callable, Sequence

from rouge_score import rouge_scorer

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(text: str, *, remove_articles: bool = False) -> str:
    """SNI's answer normalization: lowercase, remove ASCII punctuation, collapse whitespace.

    The order matters and is the scorer's: punctuation is deleted (not replaced by a space), so
    "co-operate" -> "cooperate" and "U.S.A." -> "usa". With `remove_articles` this becomes the
    original SQuAD v1.1 normalization (articles removed after the punctuation, as SQuAD does).
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    if remove_articles:
        text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def _check_references(references: Sequence[str]) -> None:
    # A bare string would be iterated character by character and silently score nonsense.
    if isinstance(references, str) or not references:
        raise ValueError(f"references must be a non-empty list of strings, got {references!r}")


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized reference, else 0.0."""
    _check_references(references)
    normalized = normalize_answer(prediction)
    return float(any(normalized == normalize_answer(ref) for ref in references))


@functools.cache
def _rouge_l_scorer() -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)


def rouge_l(prediction: str, references: Sequence[str]) -> float:
    """ROUGE-L F-measure with stemming (rouge-score's default tokenizer), max over references."""
    _check_references(references)
    scorer = _rouge_l_scorer()
    return max(scorer.score(target=ref, prediction=prediction)["rougeL"].fmeasure for ref in references)


# A number as people write it in GSM8K answers: optional minus and dollar sign (either order),
# thousands separated by commas (only in groups of three, so a list "5,6" stays two numbers),
# optional decimals. A trailing sentence period is not a decimal
# point because a decimal point must be followed by a digit.
_NUMBER = re.compile(r"(?<![\w.])(-?)\$?(-?)((?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|\.\d+)")
_ANSWER_MARKERS = (re.compile(r"the (?:final )?answer is", re.IGNORECASE), re.compile(r"####"))


def _parse_numbers(text: str) -> list[float]:
    numbers = []
    for match in _NUMBER.finditer(text):
        value = float(match.group(3).replace(",", ""))
        numbers.append(-value if (match.group(1) or match.group(2)) else value)
    return numbers


def extract_final_number(text: str) -> float | None:
    """The answer number of a GSM8K-style solution, or None when the text holds no number.

    FLAN's chain-of-thought format ends with "So the answer is X."; GSM8K's references end with
    "#### X". When either marker occurs, the first number after its LAST occurrence is the
    answer (a model may say "the answer is" twice); otherwise the last number in the text is.
    Commas, a dollar sign, a minus sign and a trailing period are handled; decimals are kept.
    """
    for marker in _ANSWER_MARKERS:
        occurrences = list(marker.finditer(text))
        if occurrences:
            numbers = _parse_numbers(text[occurrences[-1].end():])
            if numbers:
                return numbers[0]
    numbers = _parse_numbers(text)
    return numbers[-1] if numbers else None


def gsm8k_accuracy(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the prediction's final number equals a reference's final number (numerically)."""
    _check_references(references)
    predicted = extract_final_number(prediction)
    if predicted is None:
        return 0.0
    for ref in references:
        expected = extract_final_number(ref)
        if expected is None:
            raise ValueError(f"GSM8K reference has no number to compare with: {ref!r}")
        if math.isclose(predicted, expected, rel_tol=1e-9, abs_tol=1e-6):
            return 1.0
    return 0.0


MetricFn = Callable[[str, Sequence[str]], float]

# Metrics computed from the generated text alone, by the name tasks use in `task.metrics`.
GENERATION_METRICS: dict[str, MetricFn] = {
    "exact_match": exact_match,
    "rouge_l": rouge_l,
    "gsm8k_accuracy": gsm8k_accuracy,
}
# Metrics computed from the model's log-likelihoods (flan_jax.eval.scoring).
LIKELIHOOD_METRICS = ("rank_classification", "loss")
KNOWN_METRICS = tuple(GENERATION_METRICS) + LIKELIHOOD_METRICS


def check_metric_names(names: Sequence[str], *, task: str) -> None:
    """Fails early, naming the task, when a task asks for a metric nobody implements."""
    unknown = [name for name in names if name not in KNOWN_METRICS]
    if unknown:
        raise ValueError(f"Task {task!r} lists unknown metric(s) {unknown}; known metrics: {list(KNOWN_METRICS)}")


def mean_generation_metric(name: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Mean of one generation metric over a task's examples, x100 (the convention of SNI and FLAN)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError(f"cannot compute {name} over zero examples")
    fn = GENERATION_METRICS[name]
    return 100.0 * sum(fn(p, r) for p, r in zip(predictions, references)) / len(predictions)
