"""Chat templates: a model's own Jinja `chat_template`, rendered in a sandbox, and assistant spans.

    template = ChatTemplate.from_tokenizer_dir(path)        # tokenizer_config.json / chat_template.jinja
    text = template.render(messages, add_generation_prompt=True)
    text, spans = template.render_with_assistant_spans(messages)   # [(start, end) char ranges]

Rendering follows transformers' `apply_chat_template` exactly (its output is the reference, char
for char): Jinja's `ImmutableSandboxedEnvironment` (templates come from model repos and are
untrusted code: no access to Python internals, no mutation of the inputs), `trim_blocks` and
`lstrip_blocks`, the `loopcontrols` extension, the `raise_exception`, `strftime_now`, `dict` and
`namespace` globals, a `tojson` filter that does not HTML-escape, and the special tokens
(`bos_token`, `eos_token`, ...) as variables.

Assistant spans (what multi-turn SFT trains on) are derived from the rendering itself, because
stock templates lack `{% generation %}` markers: for each assistant message i, the text the template
renders for messages[:i] with the generation prompt is a prefix of what it renders for
messages[:i + 1]; the rest is what the model must produce for that turn (its content, the
end-of-turn token and whatever the template writes before the next message). When a template has
`{% generation %}` markers, the marked ranges are used instead, as transformers and TRL do. A
template for which the prefix property fails (one that re-renders earlier turns once later turns
follow, e.g. dropping past reasoning) and that has no markers is refused with the turn named.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from flan_jax.data.errors import DataError

ROLES = ("system", "user", "assistant")
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")


class ChatTemplateError(DataError):
    """A template that cannot render a conversation, or whose assistant spans cannot be derived."""


def check_messages(messages: Any, *, where: str = "messages") -> list[dict[str, str]]:
    """The conversation as a list of {"role", "content"} dicts; a bad one raises naming the message."""
    if not isinstance(messages, (list, tuple)) or not messages:
        raise DataError(f"{where} must be a non-empty list of {{'role', 'content'}} messages, got {type(messages).__name__}")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise DataError(f"{where}[{i}] must be a dict with 'role' and 'content', got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise DataError(f"{where}[{i}].role={role!r}; expected one of {ROLES}")
        if not isinstance(content, str):
            raise DataError(f"{where}[{i}].content must be a str, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


@dataclasses.dataclass
class _Tracker:
    """Where the `{% generation %}` blocks of one render landed (transformers' AssistantTracker).

    `blocks` are the output chunks rendered so far: Jinja's `generate` yields each chunk before it
    evaluates the next statement, so when a generation block runs, everything before it is there.
    """

    blocks: list[str] = dataclasses.field(default_factory=list)
    spans: list[tuple[int, int]] | None = None


def _environment(tracker: _Tracker):
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class GenerationTracker(jinja2.ext.Extension):
        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_generation"), [], [], body).set_lineno(lineno)

        def _generation(self, caller):
            text = caller()
            if tracker.spans is not None:
                start = len("".join(tracker.blocks))
                tracker.spans.append((start, start + len(text)))
            return text

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    class TemplateDict:  # `dict(...)` without exposing the dict type itself
        def __call__(self, *args, **kwargs):
            return dict(*args, **kwargs)

        def fromkeys(self, *args, **kwargs):
            return dict.fromkeys(*args, **kwargs)

    class TemplateNamespace(jinja2.utils.Namespace):  # no underscore attributes (CPython internals)
        def __init__(*args, **kwargs):
            self, args = args[0], args[1:]
            attrs = dict(*args, **kwargs)
            for name in attrs:
                TemplateNamespace._check(name)
            jinja2.utils.Namespace.__init__(self, attrs)

        def __setitem__(self, name, value):
            TemplateNamespace._check(name)
            jinja2.utils.Namespace.__setitem__(self, name, value)

        @staticmethod
        def _check(name):
            if isinstance(name, str) and name.startswith("_"):
                raise jinja2.exceptions.SecurityError(f"chat templates cannot set {name!r} on a namespace")

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[GenerationTracker, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals.update(raise_exception=raise_exception, strftime_now=lambda f: datetime.now().strftime(f),
                       dict=TemplateDict(), namespace=TemplateNamespace)
    return env


class ChatTemplate:
    """One Jinja chat template with the special tokens it may refer to."""

    def __init__(self, source: str, *, special_tokens: Mapping[str, str] | None = None, name: str = ""):
        import jinja2

        if not isinstance(source, str) or not source.strip():
            raise ChatTemplateError(f"chat template {name or ''} is empty")
        self.source = source
        self.name = name or "<chat template>"
        self.special_tokens = dict(special_tokens or {})
        self.has_generation_markers = bool(_GENERATION_TAG.search(source))
        self._tracker = _Tracker()
        self._lock = threading.Lock()  # one render at a time: the tracker is shared state
        try:
            self._template = _environment(self._tracker).from_string(source)
        except jinja2.TemplateSyntaxError as error:
            raise ChatTemplateError(f"{self.name}: not a valid Jinja template: {error.message} (line {error.lineno})") from None

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_tokenizer_dir(cls, folder: str | os.PathLike) -> ChatTemplate | None:
        """The template a tokenizer folder ships (chat_template.jinja, else tokenizer_config.json), or None."""
        folder = pathlib.Path(folder)
        if folder.is_file():
            folder = folder.parent
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        special = special_tokens_of(config)
        jinja_file = folder / "chat_template.jinja"
        if jinja_file.is_file():
            return cls(jinja_file.read_text(encoding="utf-8"), special_tokens=special, name=str(jinja_file))
        source = config.get("chat_template")
        if isinstance(source, list):  # named templates: [{"name": "default", "template": ...}, ...]
            named = {t.get("name"): t.get("template") for t in source if isinstance(t, Mapping)}
            source = named.get("default")
        if not source:
            return None
        return cls(source, special_tokens=special, name=f"{config_file} chat_template")

    @classmethod
    def from_file(cls, path: str | os.PathLike, *, special_tokens: Mapping[str, str] | None = None) -> ChatTemplate:
        path = pathlib.Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"chat template file {path} does not exist")
        return cls(path.read_text(encoding="utf-8"), special_tokens=special_tokens, name=str(path))

    # ------------------------------------------------------------------ rendering
    def render(self, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = False, **variables) -> str:
        """The conversation as the model sees it (transformers' apply_chat_template(tokenize=False))."""
        return self._render(messages, add_generation_prompt, variables, track=False)[0]

    def _render(self, messages, add_generation_prompt, variables, *, track: bool) -> tuple[str, list[tuple[int, int]]]:
        import jinja2

        context = {**self.special_tokens, **variables, "messages": [dict(m) for m in messages],
                   "add_generation_prompt": add_generation_prompt}
        with self._lock:
            tracker = self._tracker
            tracker.blocks, tracker.spans = [], ([] if track else None)
            try:
                for block in self._template.generate(**context):
                    tracker.blocks.append(block)
            except jinja2.TemplateError as error:
                raise ChatTemplateError(f"{self.name}: {type(error).__name__}: {error}") from None
            finally:
                blocks, spans = tracker.blocks, tracker.spans
                tracker.blocks, tracker.spans = [], None
        return "".join(blocks), list(spans or [])

    def render_with_assistant_spans(self, messages: Sequence[Mapping[str, str]], **variables) -> tuple[str, list[tuple[int, int]]]:
        """(rendered conversation, [(start, end)] character ranges the model is trained to produce)."""
        if self.has_generation_markers:
            return self._render(messages, False, variables, track=True)
        text = self.render(messages, **variables)
        spans = []
        for i, message in enumerate(messages):
            if message["role"] != "assistant":
                continue
            before = self.render(messages[:i], add_generation_prompt=True, **variables) if i else ""
            through = self.render(messages[: i + 1], **variables)
            if not through.startswith(before) or not text.startswith(through):
                raise ChatTemplateError(
                    f"{self.name}: cannot tell which text is assistant turn {i}: the template renders the "
                    "conversation before it differently once that turn (or a later one) follows. Use a "
                    "template with {% generation %} markers (config.data.chat_template=PATH.jinja)."
                )
            if len(through) > len(before):
                spans.append((len(before), len(through)))
        return text, spans

    def __repr__(self) -> str:
        return f"ChatTemplate({self.name!r})"


def special_tokens_of(tokenizer_config: Mapping[str, Any]) -> dict[str, str]:
    """bos_token, eos_token, ... of a tokenizer_config.json (strings or AddedToken dicts) as template variables."""
    out = {}
    for key in ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token"):
        value = tokenizer_config.get(key)
        if isinstance(value, Mapping):
            value = value.get("content")
        if isinstance(value, str):
            out[key] = value
    return out
