"""Chat examples -> token ids and the assistant-token mask multi-turn SFT trains on.

    ids, mask = assistant_token_mask(messages, tokenizer)     # mask[i] = 1: token i is assistant output

The conversation is rendered with the tokenizer's chat template (data/chat.py), which also says
which character ranges are assistant output (derived from the rendering, or its `{% generation %}`
markers). The rendered text is tokenized as a whole, exactly as transformers' `apply_chat_template`
tokenizes it (no BOS or EOS added: the template writes its own markers), and a character range
becomes the tokens from the one holding its first character to the one holding its last, as
transformers' `return_assistant_tokens_mask` (and so TRL's `assistant_only_loss`) does. A
conversation whose rendering has no assistant token is an error, never a silently zero-loss example.

Prompts for evaluation and generation (`prompt_ids`) go through the same template with the
generation prompt, so an instruct model is prompted the way it was trained.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from flan_jax.data.chat import ChatTemplateError
from flan_jax.data.errors import DataError


def renders_chats(tokenizer) -> bool:
    """Whether plain prompts go through the chat template (`chat_prompts`; False for a tokenizer
    that only has the design.md §3 basics)."""
    return bool(getattr(tokenizer, "chat_prompts", False))


def start_ids(tokenizer) -> list[int]:
    """What a plain sequence starts with: [BOS], unless the tokenizer says it adds none (`add_bos`)."""
    return [tokenizer.bos_id] if getattr(tokenizer, "add_bos", True) else []


def conversation_of(example: Mapping[str, Any], tokenizer) -> list[dict[str, str]] | None:
    """The chat an example is trained on: its `messages`, or with `tokenizer.chat_prompts` its
    inputs and targets as one user/assistant exchange (after the system prompt, if any); else None."""
    if example.get("messages"):
        return list(example["messages"])
    if not renders_chats(tokenizer):
        return None
    return [*_system(tokenizer), {"role": "user", "content": example["inputs"]},
            {"role": "assistant", "content": example["targets"]}]


def _system(tokenizer) -> list[dict[str, str]]:
    system = getattr(tokenizer, "system_prompt", "")
    return [{"role": "system", "content": system}] if system else []


def _template(tokenizer, task: str):
    if getattr(tokenizer, "chat_template", None) is None:
        raise DataError(f"{tokenizer!r} has no chat template, which chat examples need: use a tokenizer "
                        "whose tokenizer_config.json has one, or set config.data.tokenizer.chat_template=PATH.jinja",
                        task=task or None)
    return tokenizer.chat_template


def spans_to_token_mask(spans: Sequence[tuple[int, int]], offsets: Sequence[tuple[int, int]], length: int) -> list[int]:
    """0/1 per token: 1 from the token holding a span's first character to the one holding its last."""
    token_of_char: list[int | None] = [None] * length
    for index, (start, end) in enumerate(offsets):
        for char in range(start, end):
            if token_of_char[char] is None:
                token_of_char[char] = index
    mask = [0] * len(offsets)
    for start, end in spans:
        covered = [t for t in token_of_char[start:end] if t is not None]
        if covered:
            for index in range(covered[0], covered[-1] + 1):
                mask[index] = 1
    return mask


def assistant_token_mask(messages: Sequence[Mapping[str, str]], tokenizer, *, task: str = "") -> tuple[list[int], list[int]]:
    """(token ids of the rendered conversation, 1 on each assistant token); see the module docstring."""
    template = _template(tokenizer, task)
    try:
        text, spans = template.render_with_assistant_spans(messages)
    except ChatTemplateError as error:
        raise DataError(str(error), task=task or None) from None
    ids, offsets = tokenizer.encode_with_offsets(text)
    mask = spans_to_token_mask(spans, offsets, len(text))
    if 1 not in mask:
        first = next((m["content"][:60] for m in messages if m["role"] == "user"), "")
        raise DataError(
            f"{template.name} renders no assistant tokens for the conversation starting {first!r} "
            f"(roles {[m['role'] for m in messages]}); an example with nothing to train on is an error",
            task=task or None,
        )
    return ids, mask


def eval_prompt(example: Mapping[str, Any]) -> str | list[dict[str, str]]:
    """What an evaluation example prompts with: the conversation before its last assistant turn
    (a messages task), else its inputs."""
    messages = example.get("messages")
    if not messages:
        return example["inputs"]
    last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
    return list(messages[:last])


def prompt_ids(tokenizer, inputs: str | Sequence[Mapping[str, str]]) -> list[int]:
    """Token ids of a prompt for generation or scoring: the chat rendering with the generation
    prompt when the tokenizer says so (or `inputs` is a conversation), else BOS + inputs."""
    if isinstance(inputs, str) and not renders_chats(tokenizer):
        return [*start_ids(tokenizer), *tokenizer.encode(inputs)]
    messages = [*_system(tokenizer), {"role": "user", "content": inputs}] if isinstance(inputs, str) else list(inputs)
    template = _template(tokenizer, "")
    try:
        text = template.render(messages, add_generation_prompt=True)
    except ChatTemplateError as error:
        raise DataError(str(error)) from None
    return tokenizer.encode(text)
