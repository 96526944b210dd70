"""What the feature converters share: how evaluation texts become the token ids they lay out."""

from __future__ import annotations

from collections.abc import Sequence

from flan_jax.data.tokenizer import Tokenizer


class Converter:
    """Base of the converters (the interface is in converters/__init__.py)."""

    name = ""

    def prompt_from_ids(self, tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
        """The model's prompt around the instruction's token ids (a decoder's BOS, T5's EOS)."""
        raise NotImplementedError

    def prompt_ids(self, tokenizer: Tokenizer, text: str) -> list[int]:
        return self.prompt_from_ids(tokenizer, tokenizer.encode(text))

    def target_ids(self, tokenizer: Tokenizer, text: str, *, add_eos: bool = True) -> list[int]:
        """The response tokens, ending in EOS like training targets (so an option must also *end*)."""
        ids = list(tokenizer.encode(text))
        return [*ids, tokenizer.eos_id] if add_eos else ids

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
