"""Text metrics for generated answers, defined exactly as the benchmarks' official scorers define them.

Every metric here scores ONE prediction against a list of acceptable references and returns a
number in [0, 1]; the evaluator averages them over a task and reports x100. They are registered
by name at the end of this module with `flan_jax.data.register_metric`, the same call a user
makes for their own metric (see flan_jax.data.metric_registry); tasks name them in `task.metrics`.
Rank classification and loss need the model, not just text: they are computed in
`flan_jax.eval.scoring` (rank classification then scores the picked option with exact match).

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

The metrics score the *answer*: a task's `answer=` extractor (flan_jax.data.answers, e.g. the text
after "So the answer is") is applied to the generation first.
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence

from flan_jax.data.answers import normalize_answer
from flan_jax.data.metric_registry import check_metric_names, get_metric, metric_names, register_metric

__all__ = [
    "check_metric_names", "exact_match", "extract_final_number", "gsm8k_accuracy", "mean_generation_metric",
    "metric_names", "normalize_answer", "rouge_l",
]


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
def _rouge_l_scorer():
    from rouge_score import rouge_scorer  # imported on first use: nltk's stemmer costs ~0.6 s to import

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


def gsm8k_reference_problem(reference: str) -> str | None:
    """Why GSM8K accuracy cannot score against `reference` (it holds no number), checked at registration."""
    if extract_final_number(reference) is None:
        return "gsm8k_accuracy compares numbers, and this reference has none (use exact_match for non-numeric answers)"
    return None


def mean_generation_metric(name: str, predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """A registered metric's aggregate over a task's (prediction, references) pairs (x100 for the built-ins)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} reference lists")
    if not predictions:
        raise ValueError(f"cannot compute {name} over zero examples")
    metric = get_metric(name)
    return metric.aggregate([metric.score(p, r) for p, r in zip(predictions, references)])


# The built-in metrics, registered as a user registers theirs.
register_metric("exact_match", exact_match, description="SNI exact match of the normalized answer")
register_metric("rouge_l", rouge_l, description="SNI ROUGE-L F-measure (stemmed), max over references")
register_metric(
    "gsm8k_accuracy", gsm8k_accuracy, check_reference=gsm8k_reference_problem,
    description="GSM8K: the answer's final number equals the reference's",
)
register_metric(
    "rank_classification", exact_match, prediction="ranked_option",
    description="the option with the highest log-likelihood (T0/FLAN rank classification) matches a reference",
)
register_metric(
    "loss", prediction="likelihood", higher_is_better=False,
    description="mean negative log-likelihood per target token (nats), and perplexity = exp(loss)",
)
