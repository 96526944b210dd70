"""Preference data: a prompt with a chosen and a rejected response, as a task type of the registry.

A `PreferenceTask` is a `Task` whose records hold a pair. A *pair format* turns each raw record into
the three text fields `prompt`, `chosen`, `rejected` (HH-RLHF's whole dialogues, TRL's
prompt/chosen/rejected strings or chat messages, or fields that already have those names), and the
task's templates render it like any FLAN task: a template's inputs pattern may wrap the prompt
("Question: {prompt}\\nAnswer:") and its targets pattern places the response with the `{response}`
placeholder, filled once with the chosen and once with the rejected response. Both halves of a pair
are therefore rendered by the same template with the same prompt. Splits, shuffling, repetition,
mixtures and checkpointed stream positions are the `Task` machinery unchanged.

A rendered pair (docs/design.md §1 plus two keys) is

    {"inputs": prompt, "chosen": str, "rejected": str, "targets": chosen, "task", "references": [chosen],
     "options": [], "origin": "file:line"}

so an SFT mixture can also train on the chosen responses, and later stages can say where a pair
came from.

Bad pairs are never dropped silently. A missing field, a response that is not text, an empty
response or two identical responses raise a `DataError` naming file, line and field, or, with
`on_bad_pair="skip"` (default: `config.data.on_bad_record`), are counted per reason in
`task.pair_skips[split]` and logged with the first locations. Pairs whose two dialogues have
different prompts (5 of HH-RLHF's 2,312 harmless-base test pairs) are always counted and reported
this way and never raise, unless `on_prompt_mismatch="error"`.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grain

from flan_jax.data import sources
from flan_jax.data.errors import DataError
from flan_jax.data.formats import ChatFormat
from flan_jax.data.metric_registry import register_metric
from flan_jax.data.registry import Preprocessor, Task, _locate, _Renderer
from flan_jax.data.sources import Records, Source
from flan_jax.data.templates import DEFAULT_OPTION_STYLES, Template

RESPONSE_FIELD = "response"  # the targets placeholder a pair template fills with each response
PAIR_FIELDS = ("prompt", "chosen", "rejected")
PAIR_TEMPLATE = Template("{prompt}", "{" + RESPONSE_FIELD + "}", name="pair")
HH_ASSISTANT = "\n\nAssistant:"
PROMPT_MISMATCH_MODES = ("skip", "error")


class BadPair(DataError):
    """A record that cannot be a preference pair; `reason` names the kind (for the skip counts)."""

    def __init__(self, message: str, *, reason: str, field: str | None = None):
        super().__init__(message, field=field)
        self.reason = reason


class PromptMismatch(BadPair):
    """The chosen and rejected dialogues do not continue the same prompt."""

    def __init__(self, message: str, field: str | None = None):
        super().__init__(message, reason="prompt_mismatch", field=field)


def _text(record: Mapping[str, Any], field: str) -> Any:
    if field not in record:
        raise BadPair(f"missing field (fields present: {', '.join(sorted(map(str, record)))})", reason="missing_field", field=field)
    return record[field]


def check_pair(pair: Mapping[str, Any]) -> None:
    """Raises `BadPair` unless chosen and rejected are two different non-empty texts (and the prompt, if any, is text).

    A pair without a `prompt` field is fine when the task's templates build the prompt from other
    fields (the synthetic pairs do).
    """
    for field in PAIR_FIELDS:
        if field == "prompt" and field not in pair:
            continue
        value = _text(pair, field)
        if not isinstance(value, str):
            raise BadPair(f"expected text, got {type(value).__name__}", reason="not_text", field=field)
    for field in ("chosen", "rejected"):
        if not pair[field].strip():
            raise BadPair("empty response", reason="empty_response", field=field)
    if pair["chosen"] == pair["rejected"]:
        raise BadPair("chosen and rejected are identical: the pair prefers nothing", reason="identical_responses", field="rejected")


# ---------------------------------------------------------------------------- pair formats


class PairFields:
    """Records that already hold the pair as text fields (copied to `prompt`/`chosen`/`rejected`).

    `prompt=None`: the records have no prompt field; the templates build the prompt from other fields.
    """

    def __init__(self, prompt: str | None = "prompt", chosen: str = "chosen", rejected: str = "rejected"):
        self.prompt, self.chosen, self.rejected = prompt, chosen, rejected

    def __call__(self, record: dict) -> dict:
        if self.prompt is not None:
            record["prompt"] = _text(record, self.prompt)
        record["chosen"], record["rejected"] = _text(record, self.chosen), _text(record, self.rejected)
        return record

    def __repr__(self) -> str:
        return f"PairFields({self.prompt!r}, {self.chosen!r}, {self.rejected!r})"


class HHRLHFFormat:
    """Anthropic HH-RLHF: `chosen` and `rejected` are whole dialogues "\\n\\nHuman: ... \\n\\nAssistant: ...".

    The prompt is each dialogue up to and including its last "\\n\\nAssistant:"; the response is the
    rest (with its leading space). The two prompts must be identical, otherwise `PromptMismatch`.
    """

    def __init__(self, chosen: str = "chosen", rejected: str = "rejected", assistant: str = HH_ASSISTANT):
        self.chosen, self.rejected, self.assistant = chosen, rejected, assistant

    def _split(self, record: dict, field: str) -> tuple[str, str]:
        dialogue = _text(record, field)
        if not isinstance(dialogue, str):
            raise BadPair(f"expected a dialogue as text, got {type(dialogue).__name__}", reason="not_text", field=field)
        cut = dialogue.rfind(self.assistant)
        if cut < 0:
            raise BadPair(f"the dialogue has no {self.assistant!r} turn", reason="no_assistant_turn", field=field)
        cut += len(self.assistant)
        return dialogue[:cut], dialogue[cut:]

    def __call__(self, record: dict) -> dict:
        prompt, chosen = self._split(record, self.chosen)
        other_prompt, rejected = self._split(record, self.rejected)
        if prompt != other_prompt:
            at = next((i for i, (a, b) in enumerate(zip(prompt, other_prompt)) if a != b), min(len(prompt), len(other_prompt)))
            raise PromptMismatch(
                f"the chosen and rejected dialogues differ before their last {self.assistant!r} turn "
                f"(first at character {at}: {prompt[at:at + 30]!r} vs {other_prompt[at:at + 30]!r})",
                field=self.rejected,
            )
        record["prompt"], record["chosen"], record["rejected"] = prompt, chosen, rejected
        return record

    def __repr__(self) -> str:
        return f"HHRLHFFormat({self.chosen!r}, {self.rejected!r}, {self.assistant!r})"


class TRLFormat:
    """TRL's preference datasets: `prompt`/`chosen`/`rejected` as strings, or as chat messages.

    Conversational records (`[{"role", "content"}, ...]`) are rendered with `chat` (a `ChatFormat`,
    the plain role-header format by default): the prompt is its messages plus the assistant header,
    each response the text of its messages. Without a `prompt` field (TRL's "implicit prompt"), the
    prompt is the longest common prefix of the chosen and rejected conversations; if they share no
    turn, `PromptMismatch`.
    """

    def __init__(self, prompt: str = "prompt", chosen: str = "chosen", rejected: str = "rejected", chat: ChatFormat | None = None):
        self.prompt, self.chosen, self.rejected = prompt, chosen, rejected
        self.chat = chat or ChatFormat()

    def _messages(self, value: Any, field: str) -> list[dict] | None:
        """The messages of a conversational field, None for a string."""
        if isinstance(value, str):
            return None
        if not isinstance(value, list) or not all(isinstance(m, Mapping) for m in value):
            raise BadPair(f"expected text or a list of chat messages, got {type(value).__name__}", reason="not_text", field=field)
        return list(value)

    def _completion(self, messages: list[dict], field: str) -> str:
        """The text of the completion's messages after the assistant header the prompt ends with."""
        if not messages:
            raise BadPair("empty response (no messages)", reason="empty_response", field=field)
        if messages[0].get("role") != "assistant":
            raise BadPair(f"a response must start with an assistant message, got role {messages[0].get('role')!r}", reason="not_text", field=field)
        try:
            text = self.chat.render(messages)
        except DataError as error:
            raise BadPair(error.bare_message, reason="not_text", field=field) from None
        return text[len(self.chat.headers["assistant"]):].removesuffix(self.chat.turn_end)

    def __call__(self, record: dict) -> dict:
        chosen_value, rejected_value = _text(record, self.chosen), _text(record, self.rejected)
        chosen, rejected = self._messages(chosen_value, self.chosen), self._messages(rejected_value, self.rejected)
        if self.prompt in record:
            prompt_value = record[self.prompt]
            prompt_messages = self._messages(prompt_value, self.prompt)
            if (prompt_messages is None) != (chosen is None) or (chosen is None) != (rejected is None):
                raise BadPair("prompt, chosen and rejected must all be text or all be chat messages", reason="not_text", field=self.prompt)
            if prompt_messages is None:
                record["prompt"], record["chosen"], record["rejected"] = prompt_value, chosen_value, rejected_value
                return record
        else:  # implicit prompt: the shared opening turns of both conversations
            if chosen is None or rejected is None:
                raise BadPair(
                    "no prompt field: an implicit prompt needs chat messages (for whole dialogues as text use HHRLHFFormat)",
                    reason="missing_field", field=self.prompt,
                )
            shared = 0
            while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
                shared += 1
            if shared == 0:
                raise PromptMismatch("the chosen and rejected conversations share no opening turn", field=self.rejected)
            prompt_messages, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
        try:
            prompt = self.chat.render(prompt_messages) + self.chat.headers["assistant"]
        except DataError as error:
            raise BadPair(error.bare_message, reason="not_text", field=self.prompt) from None
        record["prompt"] = prompt
        record["chosen"] = self._completion(chosen, self.chosen)
        record["rejected"] = self._completion(rejected, self.rejected)
        return record

    def __repr__(self) -> str:
        return f"TRLFormat({self.prompt!r}, {self.chosen!r}, {self.rejected!r})"


# ---------------------------------------------------------------------------- the task


class PreferenceTask(Task):
    """A task of (prompt, chosen, rejected) pairs; `get_dataset(split)` yields rendered pairs.

    Args (besides `Task`'s name, source, eval_templates, preprocessors, cluster, description):
      templates: Template(s) whose targets contain `{response}` (and whose inputs do not); default
        `PAIR_TEMPLATE` = ("{prompt}", "{response}").
      pair_format: record -> record with `prompt`/`chosen`/`rejected` text (`PairFields()`,
        `HHRLHFFormat()`, `TRLFormat()`, or your own callable), applied after `preprocessors`.
      metrics: evaluation metrics (default `pair_accuracy`, see flan_jax.eval).
      options_field, option_styles: as for `Task` (a template's `{options}` shows the record's options).
      on_bad_pair: "error" or "skip" for missing/empty/identical responses (None: config.data.on_bad_record).
      on_prompt_mismatch: "skip" (counted and reported, the default) or "error".
    """

    _FIELDS = (
        "name", "source", "templates", "eval_templates", "preprocessors", "metrics", "cluster", "description",
        "options_field", "option_styles", "pair_format", "on_bad_pair", "on_prompt_mismatch",
    )

    def __init__(
        self,
        name: str,
        source: Source,
        templates: Template | tuple[str, str] | Sequence[Template | tuple[str, str]] = PAIR_TEMPLATE,
        *,
        pair_format: Preprocessor | None = None,
        eval_templates: Template | Sequence[Template | tuple[str, str]] | None = None,
        preprocessors: Sequence[Preprocessor] = (),
        metrics: Sequence[str] = ("pair_accuracy",),
        cluster: str = "",
        description: str = "",
        options_field: str | None = None,
        option_styles: Sequence[str] = DEFAULT_OPTION_STYLES,
        on_bad_pair: str | None = None,
        on_prompt_mismatch: str = "skip",
    ):
        super().__init__(
            name, source, templates, eval_templates=eval_templates, preprocessors=preprocessors,
            metrics=metrics, cluster=cluster, description=description, options_field=options_field,
            option_styles=option_styles,
        )
        for template in {*self.templates, *self.eval_templates}:
            _check_pair_template(template, name)
        if on_bad_pair is not None and on_bad_pair not in sources.BAD_RECORD_MODES:
            raise ValueError(f"on_bad_pair={on_bad_pair!r}; expected one of {sources.BAD_RECORD_MODES}")
        if on_prompt_mismatch not in PROMPT_MISMATCH_MODES:
            raise ValueError(f"on_prompt_mismatch={on_prompt_mismatch!r}; expected one of {PROMPT_MISMATCH_MODES}")
        self.pair_format = pair_format if pair_format is not None else PairFields()
        self.on_bad_pair = on_bad_pair
        self.on_prompt_mismatch = on_prompt_mismatch
        self.pair_skips: dict[str, dict[str, int]] = {}  # split -> {reason: pairs skipped}

    @property
    def bad_pair_mode(self) -> str:
        return self.on_bad_pair or sources._default_on_bad_record

    def _preprocess(self, source: Source, split: str, label: str | None = None) -> Records:
        records = super()._preprocess(source, split, label)
        split = label or split
        kept: list[dict] = []
        origins: list[tuple[str, int | None, int]] = []
        skipped: collections.Counter[str] = collections.Counter()
        first: list[str] = []
        for index, record in enumerate(records):
            try:
                pair = self.pair_format(dict(record))
                check_pair(pair)
            except BadPair as error:
                located = _locate(BadPair(error.bare_message, reason=error.reason, field=error.field), self.name, records, index)
                mismatch = isinstance(error, PromptMismatch)
                if (self.on_prompt_mismatch if mismatch else self.bad_pair_mode) == "error":
                    raise located from None
                skipped[error.reason] += 1
                if len(first) < 3:
                    first.append(str(located))
                continue
            except DataError as error:
                raise self._located(error, records, index, f"pair format {type(self.pair_format).__name__}") from error
            kept.append(pair)
            where = records.where(index)
            origins.append((where["file"], where.get("line"), where["record"]))
        self.pair_skips[split] = dict(skipped)
        if skipped:
            self.filtered[split] = self.filtered.get(split, 0) + sum(skipped.values())
            logging.warning(
                "preference task %r split %r: skipped %d of %d pairs (%s); first: %s",
                self.name, split, sum(skipped.values()), len(records),
                ", ".join(f"{n} {reason.replace('_', ' ')}" for reason, n in sorted(skipped.items())), " | ".join(first),
            )
        return Records(kept, f"{self.name}:{split}", origins=origins)

    def get_dataset(self, split: str, *, seed: int = 0, shuffle: bool = True, template_set: str = "train",
                    num_shots: int = 0, num_epochs: int | None = 1) -> grain.MapDataset:
        """Rendered pairs (see the module docstring); few-shot exemplars are not defined for pairs."""
        if num_shots:
            raise DataError(f"preference task {self.name!r}: few-shot exemplars (num_shots={num_shots}) are not defined for pairs")
        return super().get_dataset(split, seed=seed, shuffle=shuffle, template_set=template_set, num_epochs=num_epochs)

    def __repr__(self) -> str:
        return f"PreferenceTask({self.name!r}, {self.source!r}, {self.pair_format!r}, templates={[t.name for t in self.templates]})"


def _check_pair_template(template: Template, task: str) -> None:
    placeholder = "{" + RESPONSE_FIELD + "}"
    if placeholder not in template.targets:
        raise DataError(f"a pair template's targets must place the response with {placeholder}", task=task, template=template.name)
    if RESPONSE_FIELD in Template(template.inputs, "").fields:
        raise DataError(f"a pair template's inputs must not contain {placeholder}: both responses share the prompt", task=task, template=template.name)


class _PairRenderer(_Renderer):
    """Renders a record into a pair (the record order, template and options choice of `_Renderer`)."""

    def render(self, index: int, template: Template, style: str) -> dict:
        record = self.records[index]
        try:
            fields, _ = self._fields(record, style)
            prompt, chosen = template.render({**fields, RESPONSE_FIELD: record["chosen"]}, task=self.task_name)
            _, rejected = template.render({**fields, RESPONSE_FIELD: record["rejected"]}, task=self.task_name)
        except DataError as error:
            raise _locate(error, self.task_name, self.records, index) from None
        where = self.records.where(index)
        origin = where["file"] if where.get("line") is None else f"{where['file']}:{where['line']}"
        return {
            "inputs": prompt, "chosen": chosen, "rejected": rejected, "targets": chosen, "task": self.task_name,
            "references": [chosen], "options": [], "template": template.name,
            "origin": f"{origin} (record {where['record']})",
        }


PreferenceTask.renderer_class = _PairRenderer


def is_preference_task(task: Any) -> bool:
    return isinstance(task, PreferenceTask)


# The metrics of preference tasks, computed from the model's scores of both responses by
# flan_jax.eval.preference (registered here, with the task type, so that tasks naming them pass the
# registration check without importing the evaluator).
PAIR_METRICS = {
    "pair_accuracy": "% of pairs whose chosen response scores higher (reward score, DPO implicit reward or log-prob)",
    "pair_margin": "mean score(chosen) - score(rejected)",
    "logprob_accuracy": "% of pairs whose chosen response is more likely under the model",
}
for _name, _description in PAIR_METRICS.items():
    register_metric(_name, prediction="likelihood", description=_description, replace=True)


__all__ = [
    "BadPair", "HHRLHFFormat", "PAIR_TEMPLATE", "PairFields", "PreferenceTask", "PromptMismatch", "TRLFormat",
    "check_pair", "is_preference_task",
]
