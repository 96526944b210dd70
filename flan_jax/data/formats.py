"""Common instruction-data formats (Alpaca, prompt/completion, chat `messages`) and small preprocessors.

Each format becomes a preprocessor that writes a `prompt` and a `response` field, plus the template
Template("{prompt}", "{response}"), so these datasets go through the same Task machinery as
FLAN-style ones. The `*_task` helpers build such a Task in one call.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from flan_jax.data.errors import DataError
from flan_jax.data.sources import Source
from flan_jax.data.templates import Template

# The Alpaca prompts, verbatim from the Stanford Alpaca training code.
ALPACA_PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
ALPACA_PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
PROMPT_RESPONSE = Template("{prompt}", "{response}", name="prompt_response")

# A plain chat format: one header line per turn; the model's turn is the last header.
CHAT_ROLE_HEADERS = {"system": "<|system|>\n", "user": "<|user|>\n", "assistant": "<|assistant|>\n"}
CHAT_TURN_END = "\n"

_ALPACA_WITH_INPUT = Template(ALPACA_PROMPT_WITH_INPUT, "", name="alpaca_input")
_ALPACA_NO_INPUT = Template(ALPACA_PROMPT_NO_INPUT, "", name="alpaca")


class _Required:
    """Base for picklable preprocessors that need some fields."""

    def _get(self, record: dict, field: str) -> Any:
        if field not in record:
            raise DataError(f"missing field (fields present: {', '.join(sorted(record))})", field=field)
        return record[field]


class AlpacaFormat(_Required):
    """instruction/input/output -> prompt (the Alpaca prompt, with or without the input block) and response."""

    def __init__(self, instruction: str = "instruction", input: str = "input", output: str = "output"):
        self.instruction, self.input, self.output = instruction, input, output

    def __call__(self, record: dict) -> dict:
        fields = {"instruction": self._get(record, self.instruction), "input": record.get(self.input) or ""}
        template = _ALPACA_WITH_INPUT if str(fields["input"]).strip() else _ALPACA_NO_INPUT
        record["prompt"] = template.render(fields)[0]
        record["response"] = record.get(self.output, "")
        return record


class PromptCompletionFormat(_Required):
    """prompt/completion -> prompt/response, optionally stripping an end marker such as "<|endoftext|>"."""

    def __init__(self, prompt: str = "prompt", completion: str = "completion", strip_suffix: str | None = None):
        self.prompt, self.completion, self.strip_suffix = prompt, completion, strip_suffix

    def __call__(self, record: dict) -> dict:
        completion = self._get(record, self.completion)
        if self.strip_suffix:
            completion = completion.rstrip()
            completion = completion.removesuffix(self.strip_suffix)
        record["prompt"] = self._get(record, self.prompt)
        record["response"] = completion
        return record


class ChatFormat(_Required):
    """`messages` [{"role", "content"}, ...] -> prompt (all turns before the last assistant turn) + response.

    When the last message is not from the assistant (evaluation prompts), the whole conversation is
    the prompt and the response is empty.
    """

    def __init__(self, messages: str = "messages", headers: dict[str, str] | None = None, turn_end: str = CHAT_TURN_END):
        self.messages = messages
        self.headers = dict(headers or CHAT_ROLE_HEADERS)
        self.turn_end = turn_end

    def render(self, messages: Sequence[dict]) -> str:
        parts = []
        for turn in messages:
            role, content = turn.get("role"), turn.get("content")
            if role not in self.headers or not isinstance(content, str):
                raise DataError(f"each message needs a role in {sorted(self.headers)} and a str content; got {turn!r}", field=self.messages)
            parts.append(self.headers[role] + content + self.turn_end)
        return "".join(parts)

    def __call__(self, record: dict) -> dict:
        messages = self._get(record, self.messages)
        if not isinstance(messages, list) or not messages:
            raise DataError("messages must be a non-empty list", field=self.messages)
        if messages[-1].get("role") == "assistant":
            history, response = messages[:-1], messages[-1].get("content", "")
        else:
            history, response = messages, ""
        record["prompt"] = self.render(history) + self.headers["assistant"]
        record["response"] = response
        return record


class UnescapeNewlines:
    """Turns literal backslash-n sequences into newlines in the given fields (the FLAN CoT TSVs use them)."""

    def __init__(self, *fields: str):
        self.fields = fields

    def __call__(self, record: dict) -> dict:
        for field in self.fields:
            if field not in record:
                raise DataError("missing field", field=field)
            record[field] = record[field].replace("\\n", "\n")
        return record


class StripSuffix:
    """Removes a marker such as "<|endoftext|>" (and whitespace before it) from the end of fields."""

    def __init__(self, suffix: str, *fields: str):
        self.suffix, self.fields = suffix, fields

    def __call__(self, record: dict) -> dict:
        for field in self.fields:
            if field not in record:
                raise DataError("missing field", field=field)
            value = record[field].rstrip()
            record[field] = value.removesuffix(self.suffix).rstrip() if value.endswith(self.suffix) else record[field]
        return record


def _format_task(name: str, source: Source, preprocessor, preprocessors: Sequence, kwargs: dict):
    from flan_jax.data.registry import Task

    return Task(name, source, [PROMPT_RESPONSE], preprocessors=(*preprocessors, preprocessor), **kwargs)


def alpaca_task(name: str, source: Source, *, preprocessors: Sequence = (), **kwargs):
    """A Task over Alpaca-format records (instruction, input, output) with the Alpaca prompt."""
    return _format_task(name, source, AlpacaFormat(), preprocessors, kwargs)


def prompt_completion_task(name: str, source: Source, *, strip_suffix: str | None = None, preprocessors: Sequence = (), **kwargs):
    """A Task over prompt/completion records (e.g. P3/T0), optionally stripping an end marker."""
    return _format_task(name, source, PromptCompletionFormat(strip_suffix=strip_suffix), preprocessors, kwargs)


def chat_task(name: str, source: Source, *, messages: str = "messages", preprocessors: Sequence = (), **kwargs):
    """A Task over chat records with a `messages` list; the last assistant turn is the target."""
    return _format_task(name, source, ChatFormat(messages), preprocessors, kwargs)
