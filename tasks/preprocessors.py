"""Record-level clean-ups the real datasets need before templating.

Each function takes one raw record (a dict) and returns a new dict; none drops a record
silently: a record that cannot be cleaned raises `DataError` naming the field, and the
task adds the task name and record number. (The generic clean-ups, stripping an end
marker and unescaping newlines, are `flan_jax.data.StripSuffix` / `UnescapeNewlines`.)
"""

from __future__ import annotations

import re

from flan_jax.data.errors import DataError

_CALCULATOR_ANNOTATION = re.compile(r"<<[^<>]*>>")
_GSM8K_FINAL = re.compile(r"####\s*(.+?)\s*$", re.DOTALL)
_OPTION_LINE = re.compile(r"^-?\s*(.+?)\s*$")
_LETTERED = re.compile(r"^(\([A-Z]\))")


def parse_options(question: str) -> list[str]:
    """The answer options listed after an `Options:` line of a CoT question, as the answers spell them.

    `- (A) DNA` and `(A) 300` give `(A)` (the answers of aqua and qasc are the letters);
    `- Sentence A: "..."` gives `Sentence A`; `- bloody mess` gives `bloody mess`.
    Returns [] when the question lists no options.
    """
    head, sep, tail = question.partition("Options:\n")
    if not sep:
        return []
    options = []
    for line in tail.split("\n"):
        line = line.strip()
        if not line:
            continue
        text = _OPTION_LINE.match(line).group(1)
        lettered = _LETTERED.match(text)
        if lettered:
            text = lettered.group(1)
        elif text.startswith("Sentence ") and ":" in text:
            text = text.split(":", 1)[0]
        options.append(text)
    return options


def add_cot_options(record: dict) -> dict:
    """Adds `options` parsed from the question, or yes/no for yes/no answers without listed options."""
    options = parse_options(record["question"])
    if not options and record["answer"].strip().lower() in ("yes", "no"):
        options = ["yes", "no"]
    if options and record["answer"] not in options:
        raise DataError(f"answer {record['answer']!r} is not one of the parsed options {options}", field="answer")
    return {**record, "options": options}


def split_gsm8k_answer(record: dict) -> dict:
    """Splits a GSM8K `answer` into the worked solution (`rationale`) and the final number (`number`).

    The calculator annotations `<<48/2=24>>` are removed from the rationale: they are tool-use
    markup of the original release, not text a model should learn to write.
    """
    answer = record["answer"]
    match = _GSM8K_FINAL.search(answer)
    if not match:
        raise DataError("no '#### <number>' final answer", field="answer")
    number = match.group(1).replace(",", "")
    rationale = _CALCULATOR_ANNOTATION.sub("", answer[: match.start()]).strip()
    return {**record, "rationale": rationale, "number": number}


def first_instance(record: dict) -> dict:
    """Self-instruct user-oriented tasks: instruction + the input of the first instance, all outputs as references."""
    instances = record.get("instances")
    if not instances:
        raise DataError("no instances", field="instances")
    return {**record, "input": instances[0].get("input", ""), "output": instances[0]["output"],
            "references": [inst["output"] for inst in instances]}


def first_turn(record: dict) -> dict:
    """MT-bench: only the first turn is a single-turn instruction (the second refers to the first answer)."""
    turns = record.get("turns")
    if not turns:
        raise DataError("no turns", field="turns")
    return {**record, "instruction": turns[0]}


class DropEmpty:
    """Drops records whose `field` is empty or whitespace (the Task counts and logs every drop).

    Seven P3 TREC files have nothing but the end marker as completion; training on them would
    only teach the model to stop at once.
    """

    def __init__(self, field: str):
        self.field = field

    def __call__(self, record: dict) -> dict | None:
        value = record.get(self.field)
        if not isinstance(value, str):
            raise DataError(f"expected a string, got {type(value).__name__}", field=self.field)
        return record if value.strip() else None


_MOJIBAKE_MARKERS = ("\u00e2\u20ac", "\u00c3")  # "â€" and "Ã": UTF-8 bytes read as Windows-1252


def repair_mojibake(*fields: str):
    """Undoes UTF-8 text that was decoded as Windows-1252 and re-encoded ("â€“" -> "–").

    FLAN's AQuA CoT file has ~70 such records. Only a field that shows the markers and round-trips
    exactly is changed; anything else is left as published (never guessed at).
    """

    def repair(record: dict) -> dict:
        out = dict(record)
        for field in fields:
            text = out.get(field)
            if isinstance(text, str) and any(marker in text for marker in _MOJIBAKE_MARKERS):
                try:
                    out[field] = text.encode("cp1252").decode("utf-8")
                except (UnicodeEncodeError, UnicodeDecodeError):
                    pass
        return out

    repair.__name__ = f"repair_mojibake({', '.join(fields)})"
    return repair

