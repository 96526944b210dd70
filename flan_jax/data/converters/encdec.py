"""The encoder-decoder converter (T5, t5x's `EncDecFeatureConverter` layout).

One rendered example becomes

  encoder tokens  encode(inputs) + [EOS]                      (T5 inputs end with EOS, as in seqio)
  decoder targets encode(targets) + [EOS]
  decoder inputs  [decoder start = PAD] + the targets shifted right by one

and examples are packed the t5x way: inputs into encoder rows of `config.data.seq_len`, targets into
decoder rows of `config.data.targets_len` (0: seq_len), each example getting the same segment id
(1, 2, ...; 0 = padding) in both rows and positions restarting at 0 in each. An example goes into a
row only if it fits both streams. The batch:

  encoder_input_tokens, encoder_segment_ids, encoder_positions            [rows, seq_len] int32
  decoder_input_tokens, decoder_target_tokens, decoder_segment_ids,
  decoder_positions                                                       [rows, targets_len] int32
  decoder_loss_weights                                                    [rows, targets_len] float32

Over-long examples follow `config.data.overlong` and are counted like the decoder's: "drop" skips
them; "truncate" cuts the *middle* of the instruction (its start and its final cue survive; the EOS
stays) and cuts a response longer than the decoder row at its end, without EOS (the model must not
learn to stop mid-answer): an instruction cut alone counts as `truncated`, a cut response as
`response_truncated`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from flan_jax.data.converters.base import Converter
from flan_jax.data.features import FeatureConfig, Outcome, cut_middle
from flan_jax.data.tokenizer import Tokenizer

DECODER_START = 0  # T5 starts decoding with PAD (check_tokenizer insists that PAD is 0)
ENCODER_KEYS = ("encoder_input_tokens", "encoder_segment_ids", "encoder_positions")
DECODER_KEYS = ("decoder_input_tokens", "decoder_target_tokens", "decoder_segment_ids", "decoder_positions", "decoder_loss_weights")
# Per-example features: the encoder's, the decoder's (segment ids and positions are added per row).
_EXAMPLE_ENCODER = ("encoder_input_tokens",)
_EXAMPLE_DECODER = ("decoder_input_tokens", "decoder_target_tokens", "decoder_loss_weights")


def build_encdec_features(
    input_ids: Sequence[int],
    target_ids: Sequence[int],
    *,
    eos_id: int,
    decoder_start_id: int,
    config: FeatureConfig,
) -> tuple[dict[str, np.ndarray] | None, Outcome]:
    """Features of one tokenized example (None when dropped) and what was done to fit it."""
    enc_len, dec_len = EncDecConverter.row_shape(ENCDEC, config)
    outcome = Outcome.KEPT
    inputs, targets = [*input_ids, eos_id], [*target_ids, eos_id]
    if len(inputs) > enc_len or len(targets) > dec_len:
        if config.overlong == "drop":
            return None, Outcome.DROPPED
        if len(inputs) > enc_len:
            inputs = [*cut_middle(input_ids, enc_len - 1), eos_id]
            outcome = Outcome.TRUNCATED
        if len(targets) > dec_len:
            targets = list(target_ids[:dec_len])
            outcome = Outcome.RESPONSE_TRUNCATED
    targets_array = np.asarray(targets, np.int32)
    return {
        "encoder_input_tokens": np.asarray(inputs, np.int32),
        "decoder_input_tokens": np.concatenate([[decoder_start_id], targets_array[:-1]]).astype(np.int32),
        "decoder_target_tokens": targets_array,
        "decoder_loss_weights": np.ones(len(targets), np.float32),
    }, outcome


class EncDecConverter(Converter):
    name = "encdec"
    batch_keys = (*ENCODER_KEYS, *DECODER_KEYS)
    loss_keys = ("decoder_target_tokens", "decoder_loss_weights", "decoder_segment_ids")

    # ------------------------------------------------------------------ training rows
    def row_shape(self, config: FeatureConfig) -> tuple[int, int]:
        targets_len = config.targets_len or config.seq_len
        if targets_len < 2:
            raise ValueError(f"config.data.targets_len={config.targets_len} cannot hold a response and its EOS")
        return config.seq_len, targets_len

    def lengths(self, example: Mapping[str, np.ndarray]) -> tuple[int, int]:
        return len(example["encoder_input_tokens"]), len(example["decoder_target_tokens"])

    def featurize(
        self, example: Mapping[str, Any], tokenizer: Tokenizer, config: FeatureConfig
    ) -> tuple[dict[str, np.ndarray] | None, Outcome]:
        if config.loss_on_inputs:
            raise ValueError("config.data.loss_on_inputs=True has no meaning for an encoder-decoder: its inputs are not predicted")
        if example.get("messages"):
            raise ValueError(
                f"task {example.get('task', '?')!r}: a messages (chat) example trains a decoder through its chat "
                "template; an encoder-decoder trains on inputs/targets examples"
            )
        return build_encdec_features(
            tokenizer.encode(example["inputs"]), tokenizer.encode(example["targets"]),
            eos_id=tokenizer.eos_id, decoder_start_id=DECODER_START, config=config,
        )

    def build_row(self, examples: Sequence[Mapping[str, np.ndarray]], row_shape: tuple[int, int]) -> dict[str, np.ndarray]:
        """The examples one after another in an encoder row and a decoder row, then padding (all 0)."""
        enc_len, dec_len = row_shape
        row = {key: np.zeros(enc_len, np.int32) for key in ENCODER_KEYS}
        row.update({key: np.zeros(dec_len, np.float32 if key == "decoder_loss_weights" else np.int32) for key in DECODER_KEYS})
        starts = [0, 0]
        for segment, example in enumerate(examples, start=1):
            for stream, (prefix, keys, capacity) in enumerate(
                (("encoder", _EXAMPLE_ENCODER, enc_len), ("decoder", _EXAMPLE_DECODER, dec_len))
            ):
                start = starts[stream]
                end = start + len(example[keys[0]])
                if end > capacity:
                    raise ValueError(f"examples need {end} {prefix} positions, the row has {capacity}")
                for key in keys:
                    row[key][start:end] = example[key]
                row[f"{prefix}_segment_ids"][start:end] = segment
                row[f"{prefix}_positions"][start:end] = np.arange(end - start, dtype=np.int32)
                starts[stream] = end
        return row

    def pad_one(self, example: Mapping[str, np.ndarray], row_shape: tuple[int, int]) -> dict[str, np.ndarray]:
        return self.build_row([example], row_shape)

    def model_features(self, batch: Mapping[str, Any], *, prefix_lm: bool = False, rng: Any = None) -> dict[str, Any]:
        """The model's keyword features; `rng` (training) becomes the dropout key."""
        del prefix_lm  # the encoder sees its whole input bidirectionally anyway
        features = {
            key: batch[key]
            for key in ("encoder_input_tokens", "encoder_positions", "encoder_segment_ids",
                        "decoder_input_tokens", "decoder_positions", "decoder_segment_ids")
        }
        if rng is not None:
            features["dropout_rng"] = rng
        return features

    def check_tokenizer(self, tokenizer: Tokenizer) -> None:
        if getattr(tokenizer, "chat_prompts", False):
            raise ValueError(
                "config.data.tokenizer.chat_template renders chats for decoder families; an encoder-decoder "
                "reads the instruction in its encoder: leave chat_template empty"
            )
        if tokenizer.pad_id != 0:
            raise ValueError(f"tokenizer {tokenizer!r}: the encoder-decoder starts decoding with PAD = id 0, got pad_id={tokenizer.pad_id}")

    # ------------------------------------------------------------------ evaluation
    def prompt_from_ids(self, tokenizer: Tokenizer, ids: Sequence[int]) -> list[int]:
        """The encoder's input: the instruction tokens + EOS."""
        return [*ids, tokenizer.eos_id]

    def cut_prompt(self, prompt: Sequence[int], max_tokens: int) -> list[int]:
        """The first and last parts of the instruction and its final EOS, `max_tokens` in all."""
        prompt = list(prompt)
        if len(prompt) <= max_tokens:
            return prompt
        return [*cut_middle(prompt[:-1], max(max_tokens - 1, 0)), prompt[-1]]

    def prompt_budget(self, row_shape: tuple[int, int], max_new_tokens: int) -> int:
        del max_new_tokens  # generated tokens go to the decoder
        return row_shape[0]

    def score_features(
        self, prompt: Sequence[int], target: Sequence[int], row_shape: tuple[int, int]
    ) -> tuple[dict[str, np.ndarray], tuple[int, int], bool]:
        """The prompt in the encoder (middle cut to fit), the target in the decoder (cut at its end)."""
        if not prompt:
            raise ValueError("every scored sequence needs a prompt of at least one token (EOS)")
        if not target:
            raise ValueError("cannot score an empty target")
        enc_len, dec_len = row_shape
        truncated = len(prompt) > enc_len or len(target) > dec_len
        prompt, target = self.cut_prompt(prompt, enc_len), np.asarray(list(target)[:dec_len], np.int32)
        example = {
            "encoder_input_tokens": np.asarray(prompt, np.int32),
            "decoder_input_tokens": np.concatenate([[DECODER_START], target[:-1]]).astype(np.int32),
            "decoder_target_tokens": target,
            "decoder_loss_weights": np.ones(len(target), np.float32),
        }
        return example, (0, len(target)), truncated


ENCDEC = EncDecConverter()
