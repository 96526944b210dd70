"""FLAN-style templates: safe "{field}" patterns, answer-option styles, few-shot and chain-of-thought.

A `Template` is a pair of patterns (inputs, targets) over a record's fields. FLAN trains on several
differently worded templates per task; `Task` picks one per example with `choose()`, a cheap hash of
(seed, example index), so the choice is deterministic and needs no random state.

Rendering is safe by construction: a pattern may only contain `{name}` placeholders (a Python
identifier), and `{{` / `}}` for literal braces. Attribute access (`{a.b}`), indexing (`{a[0]}`),
conversions (`{a!r}`), format specs (`{a:>9}`) and positional fields are rejected when the template
is built, so rendering never evaluates anything taken from a template string. Patterns are compiled
once into a plain `str.format_map` pattern, the fastest safe rendering Python offers.
"""

from __future__ import annotations

import dataclasses
import re
import string
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from flan_jax.data.answers import AnswerAfter, AnswerExtractor, Extractor, as_extractor, option_labels
from flan_jax.data.errors import DataError

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_MASK64 = (1 << 64) - 1


def compile_pattern(pattern: str, *, template: str = "", part: str = "") -> tuple[str, tuple[str, ...]]:
    """Validates a pattern and returns (format_map pattern, field names). Raises DataError if unsafe."""
    if not isinstance(pattern, str):
        raise DataError(f"{part} pattern must be a str, got {type(pattern).__name__}", template=template)
    out: list[str] = []
    fields: list[str] = []
    try:
        parsed = list(string.Formatter().parse(pattern))
    except ValueError as error:
        raise DataError(
            f"{part} pattern {pattern!r}: {error} (write {{{{ and }}}} for literal braces)", template=template
        ) from None
    for literal, name, spec, conversion in parsed:
        out.append(literal.replace("{", "{{").replace("}", "}}"))
        if name is None:
            continue
        if not _IDENTIFIER.match(name) or spec or conversion:
            shown = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
            raise DataError(
                f"{part} pattern {pattern!r}: placeholder {shown} is not allowed; only {{field_name}} "
                "placeholders are (no attributes, indexing, conversions or format specs)",
                template=template,
            )
        out.append("{" + name + "}")
        fields.append(name)
    return "".join(out), tuple(dict.fromkeys(fields))


@dataclasses.dataclass(frozen=True)
class Template:
    """One (inputs, targets) pattern pair over record fields, e.g. Template("Q: {question}", "{answer}").

    `answer` says how the final answer is read from a generation for this template (a
    `data.Answer*` extractor, a marker string or a function; see flan_jax.data.answers); None
    uses the task's `answer=`. Chain-of-thought templates (`cot_templates`) set `AnswerAfter()`.
    """

    inputs: str
    targets: str
    name: str = ""
    answer: AnswerExtractor | None = None

    def __post_init__(self):
        object.__setattr__(self, "answer", as_extractor(self.answer))
        inputs_pattern, inputs_fields = compile_pattern(self.inputs, template=self.name, part="inputs")
        targets_pattern, targets_fields = compile_pattern(self.targets, template=self.name, part="targets")
        object.__setattr__(self, "_inputs_pattern", inputs_pattern)
        object.__setattr__(self, "_targets_pattern", targets_pattern)
        object.__setattr__(self, "fields", tuple(dict.fromkeys(inputs_fields + targets_fields)))
        object.__setattr__(self, "targets_fields", targets_fields)

    def render(self, fields: Mapping[str, object], *, task: str = "") -> tuple[str, str]:
        """Returns (inputs, targets). A missing field raises DataError naming task, template and field."""
        return self.render_inputs(fields, task=task), self.render_targets(fields, task=task)

    def render_inputs(self, fields: Mapping[str, object], *, task: str = "") -> str:
        return self._format(self._inputs_pattern, fields, task)

    def render_targets(self, fields: Mapping[str, object], *, task: str = "") -> str:
        return self._format(self._targets_pattern, fields, task)

    def _format(self, pattern: str, fields: Mapping[str, object], task: str) -> str:
        try:
            return pattern.format_map(fields)
        except KeyError as error:
            field = error.args[0] if error.args else "?"
            raise DataError(
                f"record has no such field (fields present: {', '.join(sorted(map(str, fields)))})",
                task=task or None, template=self.name or "<unnamed>", field=field,
            ) from None

    def with_name(self, name: str) -> Template:
        return dataclasses.replace(self, name=name)


def as_templates(templates: Template | tuple[str, str] | Sequence[Template | tuple[str, str]], prefix: str) -> tuple[Template, ...]:
    """Normalises templates given as Template or (inputs, targets) pairs; unnamed ones become prefix0, prefix1, ..."""
    if isinstance(templates, Template) or (
        isinstance(templates, tuple) and len(templates) == 2 and all(isinstance(t, str) for t in templates)
    ):
        templates = [templates]
    out = []
    for index, item in enumerate(templates):
        template = item if isinstance(item, Template) else Template(*item)
        if not template.name:
            template = template.with_name(f"{prefix}{index}")
        out.append(template)
    names = [t.name for t in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise DataError(f"duplicate template names: {', '.join(duplicates)}")
    return tuple(out)


# ---------------------------------------------------------------------------- deterministic choice


def choose(seed: int, index: int, count: int, salt: int = 0) -> int:
    """A well-mixed, deterministic choice in range(count) for (seed, index): splitmix64, no RNG state."""
    z = (seed * 0x9E3779B97F4A7C15 + index * 0xD1B54A32D192ED03 + salt * 0x8CB92BA72F3D8DD7 + 0x632BE59BD9B4E019) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return (z ^ (z >> 31)) % count


# ---------------------------------------------------------------------------- answer options

OPTIONS_FIELD = "options"  # the placeholder a template uses to show the answer options
# Labels come from `option_labels`, which AnswerChoice also uses to read "(B)" back as the option.


OPTION_STYLES: dict[str, Callable[[Sequence[str]], str]] = {
    "flan": lambda o: "OPTIONS:\n" + "\n".join(f"- {x}" for x in o),
    "dash": lambda o: "Options:\n- " + "\n- ".join(o),
    "letters": lambda o: "Options: " + " ".join(f"{l}) {x}" for l, x in zip(option_labels(o), o)),
    "parenthesized": lambda o: "\n".join(f"({l}) {x}" for l, x in zip(option_labels(o), o)),
    "inline": lambda o: "Choose from: " + ", ".join(o) + ".",
    "none": lambda o: "",  # renders nothing: the no-options variant for templates that keep {options}
}
DEFAULT_OPTION_STYLES = ("flan", "dash", "letters", "parenthesized", "inline")


def render_options(options: Sequence[str], style: str) -> str:
    """The options block in one of OPTION_STYLES, e.g. render_options(["yes", "no"], "flan")."""
    try:
        return OPTION_STYLES[style](options)
    except KeyError:
        raise DataError(f"unknown options style {style!r}; known: {', '.join(OPTION_STYLES)}") from None


# ---------------------------------------------------------------------------- few-shot


@dataclasses.dataclass(frozen=True)
class FewShot:
    """How k exemplars are put before the query, and where they come from.

    inputs = prefix + EX_1 + example_separator + ... + EX_k + example_separator + input_prefix + query
    with EX_i = input_prefix + inputs_i + target_prefix + targets_i, all rendered with the query's
    template. Exemplars are dropped from the end until inputs fit in `max_chars` characters.

    Where the exemplars come from (records like the task's own, run through its preprocessors):
      default            the task's own split `split` (the query itself is never its own exemplar),
                         k drawn per query from (seed, position)
      source=Source      split `split` of another source, e.g. `JsonlSource({"train": "shots.jsonl"})`,
                         drawn the same way
      exemplars=[...]    a fixed list of records: the FIRST k, in the given order, for every query
                         (the fixed k-shot prompts of chain-of-thought papers)
    `fixed_order=True/False` overrides the draw (first k in order / random k) for any of them.
    """

    prefix: str = ""
    input_prefix: str = ""
    target_prefix: str = "\n"
    example_separator: str = "\n\n"
    max_chars: int = 4096
    split: str = "train"
    source: Any = None  # a flan_jax.data Source (typed loosely: sources import nothing from here)
    exemplars: tuple[Mapping[str, Any], ...] | None = None
    fixed_order: bool | None = None

    def __post_init__(self):
        if self.source is not None and self.exemplars is not None:
            raise DataError("FewShot: give exemplars from a source or a fixed list, not both")
        if self.exemplars is not None:
            exemplars = tuple(self.exemplars)
            bad = [i for i, e in enumerate(exemplars) if not isinstance(e, Mapping)]
            if bad or not exemplars:
                raise DataError(f"FewShot(exemplars=...) needs a non-empty list of record dicts (bad items: {bad})")
            object.__setattr__(self, "exemplars", exemplars)
        if self.source is not None and not hasattr(self.source, "records"):
            raise DataError(f"FewShot(source=...) needs a flan_jax.data Source, got {type(self.source).__name__}")

    @property
    def in_order(self) -> bool:
        """Whether every query gets the first k exemplars in order (instead of k drawn per query)."""
        return self.exemplars is not None if self.fixed_order is None else self.fixed_order

    @property
    def from_task(self) -> bool:
        """Whether exemplars come from the task's own source (then the query is never its own exemplar)."""
        return self.source is None and self.exemplars is None

    def join(self, exemplars: Sequence[tuple[str, str]], query_inputs: str) -> str:
        blocks = [f"{self.input_prefix}{i}{self.target_prefix}{t}" for i, t in exemplars]
        query = f"{self.input_prefix}{query_inputs}"
        while True:
            text = self.prefix + self.example_separator.join([*blocks, query])
            if len(text) <= self.max_chars or not blocks:
                return text
            blocks.pop()


# ---------------------------------------------------------------------------- chain of thought

COT_TARGETS = "{rationale} So the answer is {answer}."
COT_TRIGGERS = (
    "Let's think step by step.",
    "Let's think first. Stream of consciousness:",
    "Give the rationale and then the answer.",
    "Think carefully first, then make a decision:",
    "Let's solve it slowly:",
)


def cot_templates(
    questions: Sequence[str],
    *,
    triggers: Sequence[str] = COT_TRIGGERS,
    targets: str = COT_TARGETS,
    prefix: str = "cot",
    answer: Extractor = AnswerAfter(),
) -> list[Template]:
    """Chain-of-thought templates: question pattern + a reasoning trigger -> rationale + "So the answer is ...".

    Question patterns and triggers are paired round-robin, so n patterns give n templates. Their
    `answer` reads the text after "the answer is" from a generation (pass `data.AnswerChoice()` for
    multiple choice, or None to score the whole generation).
    """
    return [
        Template(f"{q}\n{triggers[i % len(triggers)]}", targets, name=f"{prefix}{i}", answer=answer)
        for i, q in enumerate(questions)
    ]


def answer_only_templates(questions: Sequence[str], *, targets: str = "{answer}", prefix: str = "direct") -> list[Template]:
    """The answer-only variant of CoT data: the same questions, the bare answer as target."""
    return [Template(q, targets, name=f"{prefix}{i}") for i, q in enumerate(questions)]
