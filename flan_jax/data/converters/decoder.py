"""The decoder-only converter of docs/design.md §4 (SFT): one example is one segment of a row.

Training features come from `flan_jax.data.features` and rows from `flan_jax.data.packing`; this
module adds what evaluation needs (a prompt is BOS + the instruction, a scored target is the
response + EOS, both in the same row) and which features the decoder's model call takes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flan_jax.data import chat_features, features, packing
from flan_jax.data.converters.base import Converter
from flan_jax.data.tokenizer import Tokenizer


class DecoderConverter(Converter):
    name = "decoder"
    batch_keys = packing.BATCH_KEYS
    loss_keys = ("target_tokens", "loss_weights", "segment_ids")

    # ------------------------------------------------------------------ training rows
    def row_shape(self, config: features.FeatureConfig) -> int:
        return config.seq_len

    def lengths(self, example: Mapping[str, np.ndarray]) -> int:
        return len(example["input_tokens"])

    def featurize(
        self, example: Mapping[str, Any], tokenizer: Tokenizer, config: features.FeatureConfig
    ) -> tuple[dict[str, np.ndarray] | None, features.Outcome]:
        return features.featurize(example, tokenizer, config)

    def build_row(self, examples: Sequence[Mapping[str, np.ndarray]], row_shape: int) -> dict[str, np.ndarray]:
        return packing.build_row(examples, row_shape)

    def pad_one(self, example: Mapping[str, np.ndarray], row_shape: int) -> dict[str, np.ndarray]:
        return packing.pad_one(example, row_shape)

    def model_features(self, batch: Mapping[str, Any], *, prefix_lm: bool = False, rng: Any = None) -> dict[str, Any]:
        del rng  # the decoder has no dropout
        return {
            "input_tokens": batch["input_tokens"],
            "positions": batch["positions"],
            "segment_ids": batch["segment_ids"],
            "prefix_mask": batch["prefix_mask"] if prefix_lm else None,
        }

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if getattr(tokenizer, "bos_id", None) is None or tokenizer.bos_id < 0:
            raise ValueError(
                f"tokenizer {tokenizer!r} has no BOS token, which every decoder row starts with "
                "(a T5 tokenizer? T5 checkpoints belong to config.model.family='t5')"
            )

    # ------------------------------------------------------------------ evaluation
    def prompt_from_ids(self, tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
        """BOS (unless the tokenizer adds none) + the instruction tokens: what the model conditions
        on (training's layout)."""
        return [*chat_features.start_ids(tokenizer), *ids]

    def prompt_ids(self, tokenizer: Tokenizer, prompt: str | Sequence[Mapping[str, str]]) -> list[int]:
        """`prompt_from_ids` of a text, or the chat template's rendering with its generation prompt
        (a conversation, or any prompt when the tokenizer renders chats; data/chat_features.py)."""
        return chat_features.prompt_ids(tokenizer, prompt)

    def cut_prompt(self, prompt: Sequence[int], max_tokens: int) -> list[int]:
        """BOS + the first and last parts of the instruction, `max_tokens` tokens in all."""
        prompt = list(prompt)
        if len(prompt) <= max_tokens:
            return prompt
        keep = max(max_tokens - 1, 0)
        head = keep // 2
        return [prompt[0], *prompt[1:1 + head], *prompt[len(prompt) - (keep - head):]] if keep else prompt[:1]

    def prompt_budget(self, row_shape: int, max_new_tokens: int) -> int:
        """Prompt tokens that fit in a row with `max_new_tokens` generated after them."""
        return max(row_shape - max_new_tokens, 1)

    def fit(self, prompt: Sequence[int], target: Sequence[int], max_len: int) -> tuple[list[int], list[int], bool]:
        """Cuts the sequence so that its len(prompt) + len(target) - 1 model inputs fit in max_len.

        The target is what we measure, so the prompt gives way first, and like the training
        features it loses its *middle*: the task description at its start and the answer cue at its
        end both survive. Only a target that alone does not fit is cut, at its end.
        """
        prompt, target = list(prompt), list(target)
        if not prompt:
            raise ValueError("every scored sequence needs a prompt of at least one token (BOS)")
        if not target:
            raise ValueError("cannot score an empty target")
        if len(prompt) + len(target) - 1 <= max_len:
            return prompt, target, False
        if len(target) >= max_len:
            return prompt[:1], target[:max_len], True
        return self.cut_prompt(prompt, max_len - len(target) + 1), target, True

    def score_features(
        self, prompt: Sequence[int], target: Sequence[int], row_shape: int
    ) -> tuple[dict[str, np.ndarray], tuple[int, int], bool]:
        """The row features of prompt + target (the model sees prompt + target[:-1]) and where the
        target's log-probabilities are: the last prompt token predicts the first target token."""
        prompt, target, truncated = self.fit(prompt, target, row_shape)
        tokens = np.asarray(prompt + target, np.int32)
        n = len(tokens) - 1
        prefix = np.zeros(n, np.int32)
        prefix[: len(prompt)] = 1
        weights = np.zeros(n, np.float32)
        weights[len(prompt) - 1:] = 1.0
        example = {"input_tokens": tokens[:-1], "target_tokens": tokens[1:], "loss_weights": weights, "prefix_mask": prefix}
        return example, (len(prompt) - 1, n), truncated


DECODER = DecoderConverter()
