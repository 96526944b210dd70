"""The prompts of an RL run: the training mixture's rendered examples, a step's worth at a time, resumable.

The stream is the one SFT reads (`loader.mixed_examples`: the registered task or mixture of
`config.data.train_mixture`, rendered with its templates, shuffled and mixed by rate, a function of
the seed only), so FLAN templates, held-out templates and mixtures work for RL unchanged. A prompt
is `[BOS] + tokens(example["inputs"])`; its example (task, template, references, options) stays
with it, since the reward reads them.

The stream has random access, so the iterator's state is its position plus the counts of prompts
that were too long: a small JSON dict that the trainer's checkpoints hold (it is a
`grain.DatasetIterator`, saved and restored like the SFT loader's). Every process reads the whole
global list of a step's prompts (a few hundred strings), so the state does not depend on the
process count.

A prompt longer than its budget (`data.seq_len - rl.max_new_tokens` tokens, BOS included) is an
error naming its task, template and stream position (`rl.on_long_prompt="error"`), or skipped
("skip": the next prompt is drawn) or cut in the middle like evaluation prompts ("truncate"); both
are counted in the state and logged with the metrics.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping
from typing import Any

import grain

from flan_jax.data.tokenizer import Tokenizer

LONG_PROMPT_POLICIES = ("error", "skip", "truncate")
_STATE_VERSION = 1


class PromptTooLongError(ValueError):
    """A prompt does not fit its budget and `config.rl.on_long_prompt` is "error"."""


@dataclasses.dataclass(frozen=True)
class Prompt:
    """One prompt of a step: its rendered example, token ids (BOS first) and stream position."""

    example: dict
    tokens: list[int]
    position: int
    tokens_cut: int = 0


def describe(example: Mapping[str, Any], limit: int = 160) -> str:
    """`task 'x', template 'y', prompt '...'` for error messages (the prompt shortened)."""
    text = str(example.get("inputs", ""))
    shown = text if len(text) <= limit else text[: limit // 2] + " ... " + text[-limit // 2:]
    return f"task {example.get('task')!r}, template {example.get('template')!r}, prompt {shown!r}"


class PromptIterator(grain.DatasetIterator):
    """Yields the list of `prompts_per_step` prompts of each step (see the module docstring)."""

    def __init__(
        self,
        examples: grain.MapDataset,
        tokenizer: Tokenizer,
        *,
        prompts_per_step: int,
        max_prompt_tokens: int,
        on_long_prompt: str = "error",
        fingerprint: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        if on_long_prompt not in LONG_PROMPT_POLICIES:
            raise ValueError(f"config.rl.on_long_prompt={on_long_prompt!r}: expected one of {LONG_PROMPT_POLICIES}")
        if prompts_per_step < 1 or max_prompt_tokens < 2:
            raise ValueError(f"prompts_per_step={prompts_per_step} and max_prompt_tokens={max_prompt_tokens} must be >= 1 and >= 2")
        self._examples = examples
        self._tokenizer = tokenizer
        self._per_step = int(prompts_per_step)
        self._budget = int(max_prompt_tokens)
        self._policy = on_long_prompt
        self._fingerprint = {
            **dict(fingerprint or {}), "prompts_per_step": self._per_step, "max_prompt_tokens": self._budget,
            "on_long_prompt": on_long_prompt, "vocab_size": int(tokenizer.vocab_size),
        }
        self._position = 0
        self.skipped = 0  # prompts over budget left out ("skip")
        self.truncated = 0  # prompts cut to the budget ("truncate")
        self._next_report = 1

    def __next__(self) -> list[Prompt]:
        prompts: list[Prompt] = []
        while len(prompts) < self._per_step:
            wanted = self._per_step - len(prompts)
            positions = range(self._position, self._position + wanted)
            examples = [self._examples[p] for p in positions]
            encoded = self._tokenizer.encode_batch([str(ex["inputs"]) for ex in examples])
            self._position += wanted
            for position, example, ids in zip(positions, examples, encoded):
                prompt = self._fit(position, example, [self._tokenizer.bos_id, *ids])
                if prompt is not None:
                    prompts.append(prompt)
        self._report()
        return prompts

    def _fit(self, position: int, example: dict, tokens: list[int]) -> Prompt | None:
        if len(tokens) <= self._budget:
            return Prompt(example, tokens, position)
        if self._policy == "error":
            raise PromptTooLongError(
                f"RL prompt at stream position {position} ({describe(example)}) has {len(tokens)} tokens with BOS, "
                f"over its budget of {self._budget} (data.seq_len - rl.max_new_tokens); raise data.seq_len, lower "
                "rl.max_new_tokens, or set rl.on_long_prompt='skip' or 'truncate' (counted and logged)"
            )
        if self._policy == "skip":
            self.skipped += 1
            return None
        from flan_jax.eval.scoring import cut_prompt  # evaluation cuts over-long prompts the same way

        self.truncated += 1
        kept = cut_prompt(tokens, self._budget)
        return Prompt(example, kept, position, tokens_cut=len(tokens) - len(kept))

    def _report(self) -> None:
        total = self.skipped + self.truncated
        if total >= self._next_report:
            while self._next_report <= total:
                self._next_report *= 2
            logging.warning(
                "rl prompts over %d tokens so far: %d skipped, %d truncated (rl.on_long_prompt=%r)",
                self._budget, self.skipped, self.truncated, self._policy,
            )

    def counts(self) -> dict[str, int]:
        """Running totals logged with the metrics."""
        return {"prompts_read": self._position, "prompts_skipped": self.skipped, "prompts_truncated": self.truncated}

    def get_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION, "pipeline": dict(self._fingerprint), "position": self._position,
            "skipped": self.skipped, "truncated": self.truncated,
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"RL prompt iterator state has version {state.get('version')}, expected {_STATE_VERSION}")
        saved = dict(state["pipeline"])
        if saved != self._fingerprint:
            changed = sorted(k for k in set(saved) | set(self._fingerprint) if saved.get(k) != self._fingerprint.get(k))
            raise ValueError(
                "the RL prompt stream in the checkpoint was made with different settings: "
                + ", ".join(f"{k}: {saved.get(k)!r} -> {self._fingerprint.get(k)!r}" for k in changed)
                + "; resuming would change the prompts"
            )
        self._position = int(state["position"])
        self.skipped, self.truncated = int(state["skipped"]), int(state["truncated"])
        self._next_report = 1
        while self._next_report <= self.skipped + self.truncated:
            self._next_report *= 2

    def __str__(self) -> str:
        return f"PromptIterator(prompts_per_step={self._per_step}, max_prompt_tokens={self._budget})"


def make_prompt_iterator(config: Any, tokenizer: Tokenizer, *, prompts_per_step: int, max_prompt_tokens: int) -> PromptIterator:
    """The run's prompt stream: `config.data.train_mixture`'s training examples from `config.seed`."""
    from flan_jax.data import loader

    examples = loader.mixed_examples(config.data, seed=int(config.seed))
    return PromptIterator(
        examples, tokenizer, prompts_per_step=prompts_per_step, max_prompt_tokens=max_prompt_tokens,
        on_long_prompt=str(config.rl.on_long_prompt),
        fingerprint={"source": f"{config.data.train_mixture}:{config.data.train_split}", "seed": int(config.seed)},
    )
