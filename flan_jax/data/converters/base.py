"""What the feature converters share: how evaluation texts become the token ids they lay out."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from flan_jax.data.tokenizer import Tokenizer


class Converter:
    """Base of the converters (the interface is in converters/__init__.py)."""

    name = ""

    def prompt_from_ids(self, tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
        """The model's prompt around the instruction's token ids (a decoder's BOS, T5's EOS)."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer: Tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> list[int]:
        """What the model conditions on for an evaluation prompt (a text; the decoder also takes a
        conversation, data/chat_features.py)."""
        if not isinstance(prompt, str):
            raise ValueError(
                f"the {self.name} feature converter prompts with text; a conversation (a messages task's "
                "prompt) needs a chat template, which only decoder families render"
            )
        return self.prompt_from_ids(tokenizer, tokenizer.encode(prompt))

    def target_ids(self, tokenizer: Tokenizer, text: str, *, add_eos: bool = True) -> list[int]:
        """The response tokens, ending in EOS like training targets (so an option must also *end*)."""
        ids = list(tokenizer.encode(text))
        return [*ids, tokenizer.eos_id] if add_eos else ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
