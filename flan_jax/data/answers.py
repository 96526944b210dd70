"""How the final answer is read from a generation, declared with the task (or one of its templates).

A chain-of-thought model writes "... 3 + 4 = 7. So the answer is 7."; exact match against the
reference "7" must score the *answer*, not the whole generation. A task says how to find it with
`answer=` (and a template may override it with its own `answer=`); the evaluator applies it to
every generation before any metric, and writes both texts to the predictions file.

    data.AnswerAfter()                    FLAN: the text after the last "the answer is" ("So the answer is X.")
    data.AnswerAfter("####")              GSM8K's "#### 72"
    data.AnswerRegex(r"Final: (\\w+)")     the (last) match of a regular expression, group 1
    data.AnswerFunction(my_fn)            any function text -> answer (or (text, example) -> answer)
    data.AnswerChoice()                   multiple choice: "(B)", "B", "B)", "B." or the option's text
                                          -> the option itself, after `AnswerAfter()` by default

`answer="####"` (a str) is short for `AnswerAfter("####")` and a plain function for `AnswerFunction`.
Extractors are small frozen dataclasses: comparable, picklable (grain workers), free of state.

`normalize_answer` lives here because matching an answer to an option is the same comparison exact
match makes (flan_jax.eval.metrics re-exports it next to the metric that defines it).
"""

from __future__ import annotations

import abc
import dataclasses
import inspect
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Union

from flan_jax.data.errors import DataError

_PUNCTUATION = frozenset(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")
MISSING_MODES = ("text", "empty")


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


def option_labels(options: Sequence[str]) -> list[str]:
    """The labels the "letters" and "parenthesized" option styles show: A, B, ... Z, then 27, 28, ..."""
    return [chr(ord("A") + i) if i < 26 else str(i + 1) for i in range(len(options))]


def accepts_positional(fn: Callable, count: int) -> bool:
    """Whether `fn` can be called with `count` positional arguments (user functions may omit the example)."""
    try:
        parameters = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature: call them with the fewest arguments
        return False
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return any(p.kind == p.VAR_POSITIONAL for p in parameters) or len(positional) >= count


def _check_missing(missing: str) -> None:
    if missing not in MISSING_MODES:
        raise ValueError(f"missing={missing!r}: expected one of {MISSING_MODES}")


class AnswerExtractor(abc.ABC):
    """Reads the final answer from a generation; `example` is the rendered example (options, references)."""

    needs_options = False  # True: the task must have answer options (options_field)

    @abc.abstractmethod
    def extract(self, text: str, example: Mapping[str, Any]) -> str:
        """The answer in `text` (a str, possibly empty)."""

    def __call__(self, text: str, example: Mapping[str, Any] | None = None) -> str:
        return self.extract(text, example or {})

    def check(self, example: Mapping[str, Any]) -> str | None:
        """Why no answer this extractor can give could ever be right for `example` (None: it can be)."""
        return None


@dataclasses.dataclass(frozen=True)
class AnswerAfter(AnswerExtractor):
    """The text after the LAST occurrence of any marker (case-insensitive), up to `stop`.

    "Let's see. 3 + 4 = 7. So the answer is 7." -> "7"; "... So the answer is (B).\\nNext" -> "(B)".
    `stop` (a regular expression) ends the answer: by default a newline or a sentence end (a period
    followed by whitespace), so "So the answer is yes. Because ..." gives "yes"; one trailing period
    and surrounding whitespace or ":" are removed. Without any marker in the text, `missing="text"`
    returns the whole (stripped) text, so a model that answers directly is still scored, and
    `missing="empty"` returns "" (scored wrong).
    """

    markers: tuple[str, ...] = ("the answer is",)
    stop: str = r"\n|\.\s"
    missing: str = "text"

    def __init__(self, *markers: str, stop: str = r"\n|\.\s", missing: str = "text"):
        markers = markers or ("the answer is",)
        if not all(isinstance(m, str) and m for m in markers):
            raise ValueError(f"AnswerAfter markers must be non-empty strings, got {markers!r}")
        _check_missing(missing)
        re.compile(stop)
        object.__setattr__(self, "markers", tuple(markers))
        object.__setattr__(self, "stop", stop)
        object.__setattr__(self, "missing", missing)

    def extract(self, text: str, example: Mapping[str, Any]) -> str:
        lowered = text.lower()
        end = max((lowered.rfind(m.lower()) + len(m) for m in self.markers if m.lower() in lowered), default=-1)
        if end < 0:
            return text.strip() if self.missing == "text" else ""
        rest = text[end:].lstrip(" \t:")
        cut = re.search(self.stop, rest)
        if cut:
            rest = rest[: cut.start()]
        rest = rest.strip()
        return rest[:-1].rstrip() if rest.endswith(".") else rest


@dataclasses.dataclass(frozen=True)
class AnswerRegex(AnswerExtractor):
    """A regular expression's match (the last one unless `occurrence="first"`); `group` 1 when it has groups."""

    pattern: str
    group: int | str | None = None
    occurrence: str = "last"
    flags: int = 0
    missing: str = "text"

    def __post_init__(self):
        try:
            compiled = re.compile(self.pattern, self.flags)
        except re.error as error:
            raise ValueError(f"AnswerRegex pattern {self.pattern!r}: {error}") from None
        if self.occurrence not in ("first", "last"):
            raise ValueError(f"occurrence={self.occurrence!r}: expected 'first' or 'last'")
        _check_missing(self.missing)
        if self.group is None:
            object.__setattr__(self, "group", 1 if compiled.groups else 0)

    def extract(self, text: str, example: Mapping[str, Any]) -> str:
        matches = list(re.finditer(self.pattern, text, self.flags))
        if not matches:
            return text.strip() if self.missing == "text" else ""
        match = matches[-1] if self.occurrence == "last" else matches[0]
        return (match.group(self.group) or "").strip()


@dataclasses.dataclass(frozen=True)
class AnswerFunction(AnswerExtractor):
    """Any function `text -> answer` or `(text, example) -> answer` (module-level, so it pickles)."""

    fn: Callable[..., str]

    def __post_init__(self):
        if not callable(self.fn):
            raise TypeError(f"AnswerFunction needs a callable, got {type(self.fn).__name__}")

    def extract(self, text: str, example: Mapping[str, Any]) -> str:
        answer = self.fn(text, example) if accepts_positional(self.fn, 2) else self.fn(text)
        if not isinstance(answer, str):
            name = getattr(self.fn, "__name__", repr(self.fn))
            raise TypeError(f"answer function {name} returned a {type(answer).__name__}, not a str")
        return answer


_LABEL_ONLY = re.compile(r"^\(?([A-Za-z]|\d+)\)?[.:)]?$")
_LABEL_FIRST = re.compile(r"^(?:\(([A-Za-z]|\d+)\)|([A-Za-z]|\d+)[.:)])\s+\S")


@dataclasses.dataclass(frozen=True)
class AnswerChoice(AnswerExtractor):
    """Multiple choice: maps the answer `inner` reads to one of the example's options.

    "(B)", "B", "B)", "B." and "(B) green" give option B (labels as the letter option styles show
    them, `option_labels`); text equal to an option up to case and punctuation gives that option.
    A bare lowercase letter counts too ("b"), as does "b)". Anything else is returned as `inner`
    read it, and is scored against the references as such (usually wrong). When the options
    themselves are labels ("(A)", "(B)", as in FLAN's AQuA), the text match comes first.
    """

    inner: AnswerExtractor | None = None

    needs_options = True

    def __post_init__(self):
        object.__setattr__(self, "inner", as_extractor(self.inner) or AnswerAfter())

    def extract(self, text: str, example: Mapping[str, Any]) -> str:
        answer = self.inner.extract(text, example)
        options = list(example.get("options") or [])
        return self.to_option(answer, options)

    @staticmethod
    def to_option(answer: str, options: Sequence[str]) -> str:
        """The option `answer` names (by its text or its label), else `answer` unchanged."""
        if not options:
            return answer
        normalized = normalize_answer(answer)
        for option in options:
            if normalize_answer(option) == normalized:
                return option
        match = _LABEL_ONLY.match(answer.strip()) or _LABEL_FIRST.match(answer.strip())
        if match:
            label = next(g for g in match.groups() if g).upper()
            labels = option_labels(options)
            if label in labels:
                return options[labels.index(label)]
        return answer

    def check(self, example: Mapping[str, Any]) -> str | None:
        return options_problem(example)


def options_problem(example: Mapping[str, Any]) -> str | None:
    """Why an example whose answer must be one of its options could never be right (None: it can)."""
    options = list(example.get("options") or [])
    references = list(example.get("references") or [])
    if not options:
        return "has no answer options, but its answer must be one of them"
    wanted = {normalize_answer(option) for option in options}
    if not any(normalize_answer(ref) in wanted for ref in references):
        return (
            f"no answer option {options} matches the references {references} "
            "(a letter reference like 'B' must be mapped to its option's text, e.g. in a preprocessor)"
        )
    return None


Extractor = Union[AnswerExtractor, str, Callable[..., str], None]


def as_extractor(value: Extractor) -> AnswerExtractor | None:
    """None, an extractor, a marker string (-> AnswerAfter(marker)) or a function (-> AnswerFunction)."""
    if value is None or isinstance(value, AnswerExtractor):
        return value
    if isinstance(value, str):
        return AnswerAfter(value)
    if callable(value):
        return AnswerFunction(value)
    raise DataError(
        f"answer= must be a data.Answer* extractor, a marker string or a function, got {type(value).__name__}"
    )
