"""Log-likelihood of target texts under the model: per-task loss and rank classification.

Both FLAN and T0 score multiple-choice tasks by *rank classification*: every answer option is
appended to the prompt, the model's log-likelihood of the option tokens is computed, and the
best-scoring option is the prediction. Nothing is generated, so a model is never penalised for
a near-miss spelling of a valid option. The same per-target log-likelihoods give the per-task
loss (mean negative log-likelihood per target token) and perplexity.

Efficiency: many (prompt, target) sequences are packed into each row (block-diagonal causal
attention through `segment_ids`, positions restarting per sequence, as in training), rows are
batched, and row length and row count are rounded up to powers of two so only a handful of
shapes is ever compiled.
"""

from __future__ import annotations

import bisect
import dataclasses
import functools
import logging
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from flan_jax.data import chat_features
from flan_jax.eval import report

_MIN_ROW_LEN = 16


@dataclasses.dataclass(frozen=True)
class TargetScore:
    """The log-likelihood of one target given its prompt."""

    log_likelihood: float  # sum of the target tokens' log-probabilities (natural log)
    num_tokens: int  # target tokens scored (EOS included when the target carries it)
    truncated: bool = False  # the prompt (or the target) was cut to fit the maximum length

    def score(self, length_normalized: bool) -> float:
        """Sum of log-probs, or their mean per token when comparing targets of different lengths."""
        return self.log_likelihood / max(self.num_tokens, 1) if length_normalized else self.log_likelihood


def encode_prompt(tokenizer, inputs) -> list[int]:
    """What the model conditions on, laid out as in training (design.md §4): BOS + the instruction
    tokens, or the chat template's rendering with its generation prompt (a conversation, or any
    prompt when the tokenizer renders chats; data/chat_features.py)."""
    return chat_features.prompt_ids(tokenizer, inputs)


def encode_target(tokenizer, target: str, *, add_eos: bool = True) -> list[int]:
    """The response tokens, ending in EOS like training targets (so an option must also *end*)."""
    ids = list(tokenizer.encode(target))
    return [*ids, tokenizer.eos_id] if add_eos else ids


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def _fit(prompt: Sequence[int], target: Sequence[int], max_len: int) -> tuple[list[int], list[int], bool]:
    """Cuts the sequence so that its len(prompt) + len(target) - 1 model inputs fit in max_len.

    The target is what we measure, so the prompt gives way first, and like the training features
    (flan_jax.data.features) it loses its *middle*: the task description at its start and the
    answer cue at its end both survive. Only a target that alone does not fit is cut, at its end.
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
    return cut_prompt(prompt, max_len - len(target) + 1), target, True


def cut_prompt(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """BOS + the first and last parts of the instruction, `max_tokens` tokens in all."""
    prompt = list(prompt)
    if len(prompt) <= max_tokens:
        return prompt
    keep = max(max_tokens - 1, 0)
    head = keep // 2
    return [prompt[0], *prompt[1:1 + head], *prompt[len(prompt) - (keep - head):]] if keep else prompt[:1]


def _pack(lengths: Sequence[int], row_len: int) -> tuple[list[int], list[int]]:
    """Best-fit-decreasing: the row index and offset of each sequence of model-input length.

    Longest first, each into the fullest row that still has room (a sorted list of free
    capacities, so thousands of options of a large evaluation pack in milliseconds).
    """
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    free: list[tuple[int, int]] = []  # (remaining capacity, row), sorted
    used = []  # tokens already placed per row
    rows = [0] * len(lengths)
    offsets = [0] * len(lengths)
    for i in order:
        n = lengths[i]
        slot = bisect.bisect_left(free, (n, -1))
        if slot < len(free):
            capacity, r = free.pop(slot)
        else:
            capacity, r = row_len, len(used)
            used.append(0)
        rows[i], offsets[i] = r, used[r]
        used[r] += n
        if capacity - n > 0:
            bisect.insort(free, (capacity - n, r))
    return rows, offsets


@functools.partial(jax.jit, static_argnums=(0,))
def _target_log_probs(graphdef, state, input_tokens, target_tokens, positions, segment_ids, prefix_mask):
    model = nnx.merge(graphdef, state)
    logits = model(input_tokens, positions=positions, segment_ids=segment_ids, prefix_mask=prefix_mask)
    # log p(target) = logit[target] - logsumexp(logits): no second [B, L, vocab] array is built.
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, target_tokens[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def score_targets(
    model: nnx.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_len: int,
    batch_rows: int = 16,
    prefix_lm: bool = False,
) -> list[TargetScore]:
    """Log-likelihood of each target given its prompt, in packed, batched forward passes.

    `sequences` holds (prompt_ids, target_ids) pairs; the prompt starts with BOS (see
    `encode_prompt`). The model sees prompt + target[:-1] and is scored on predicting target.
    With `prefix_lm`, the prompt positions get `prefix_mask=1` (bidirectional), as in training.
    """
    if not sequences:
        return []
    fitted = [_fit(p, t, max_len) for p, t in sequences]
    num_truncated = sum(f[2] for f in fitted)
    if num_truncated:
        logging.info("scoring: %d of %d sequences cut to max_len=%d", num_truncated, len(fitted), max_len)
    lengths = [len(p) + len(t) - 1 for p, t, _ in fitted]
    row_len = min(max(_MIN_ROW_LEN, _next_power_of_two(max(lengths))), max(max_len, max(lengths)))
    rows, offsets = _pack(lengths, row_len)
    num_rows = max(rows) + 1

    input_tokens = np.zeros((num_rows, row_len), np.int32)
    target_tokens = np.zeros((num_rows, row_len), np.int32)
    positions = np.zeros((num_rows, row_len), np.int32)
    segment_ids = np.zeros((num_rows, row_len), np.int32)
    prefix_mask = np.zeros((num_rows, row_len), np.int32)
    segments_in_row = [0] * num_rows
    for (prompt, target, _), r, o, n in zip(fitted, rows, offsets, lengths):
        tokens = np.asarray(prompt + target, np.int32)
        segments_in_row[r] += 1
        input_tokens[r, o:o + n] = tokens[:-1]
        target_tokens[r, o:o + n] = tokens[1:]
        positions[r, o:o + n] = np.arange(n)
        segment_ids[r, o:o + n] = segments_in_row[r]
        prefix_mask[r, o:o + len(prompt)] = 1

    graphdef, state = nnx.split(model)
    token_log_probs = np.zeros((num_rows, row_len), np.float32)
    start = 0
    while start < num_rows:
        # Fixed batch shapes: full batches of `batch_rows`, then a power-of-two remainder.
        size = min(batch_rows, _next_power_of_two(num_rows - start))
        stop = min(start + size, num_rows)

        def padded(a, start=start, stop=stop, size=size):
            out = np.zeros((size, row_len), a.dtype)
            out[: stop - start] = a[start:stop]
            return out

        result = _target_log_probs(
            graphdef,
            state,
            padded(input_tokens),
            padded(target_tokens),
            padded(positions),
            padded(segment_ids),
            padded(prefix_mask) if prefix_lm else None,
        )
        token_log_probs[start:stop] = np.asarray(result)[: stop - start]
        start = stop

    scores = []
    for (prompt, target, truncated), r, o, n in zip(fitted, rows, offsets, lengths):
        first = o + len(prompt) - 1  # the last prompt token predicts the first target token
        log_likelihood = float(token_log_probs[r, first:o + n].sum(dtype=np.float64))
        scores.append(TargetScore(log_likelihood, len(target), truncated))
    return scores


@dataclasses.dataclass(frozen=True)
class RankResult:
    """Rank classification of one example: the chosen option and every option's score."""

    choice: int
    scores: tuple[float, ...]
    truncated: bool = False  # some option's sequence was cut to fit the maximum length


def rank_classify(
    model: nnx.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    max_len: int,
    batch_rows: int = 16,
    prefix_lm: bool = False,
    length_normalized: bool = False,
) -> list[RankResult]:
    """Picks, for each example, the option of `example["options"]` the model finds most likely.

    The score is the sum of the option tokens' log-probabilities (EOS included, so "yes" and
    "yes please" are told apart), as in T0 and FLAN. `length_normalized=True` uses the mean
    per token instead, which removes the bias towards short options that the sum has when
    options differ much in length. Ties go to the earlier option. All options of all examples
    are scored together in packed batches.
    """
    sequences, owners = [], []
    for index, example in enumerate(examples):
        options = list(example.get("options") or [])
        if not options:
            raise ValueError(
                f"rank classification needs answer options, but example {index} of task "
                f"{example.get('task', '?')!r} has an empty 'options' field"
            )
        prompt = encode_prompt(tokenizer, chat_features.eval_prompt(example))
        for option in options:
            sequences.append((prompt, encode_target(tokenizer, option)))
            owners.append(index)
    flat = score_targets(model, sequences, max_len=max_len, batch_rows=batch_rows, prefix_lm=prefix_lm)
    per_example: list[list[float]] = [[] for _ in examples]
    cut = [False] * len(examples)
    for owner, score in zip(owners, flat):
        per_example[owner].append(score.score(length_normalized))
        cut[owner] = cut[owner] or score.truncated
    return [RankResult(int(np.argmax(s)), tuple(s), c) for s, c in zip(per_example, cut)]


def target_loss(
    model: nnx.Module,
    tokenizer,
    examples: Sequence[dict],
    *,
    max_len: int,
    batch_rows: int = 16,
    prefix_lm: bool = False,
) -> dict[str, float]:
    """Mean negative log-likelihood per target token (training's "tokens" normalization) and perplexity."""
    sequences = target_sequences(tokenizer, examples)
    return mean_loss(score_targets(model, sequences, max_len=max_len, batch_rows=batch_rows, prefix_lm=prefix_lm))


def target_sequences(tokenizer, examples: Sequence[dict]) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) of each rendered example, as `score_targets` takes them."""
    return [(encode_prompt(tokenizer, chat_features.eval_prompt(ex)), encode_target(tokenizer, ex["targets"]))
            for ex in examples]


def mean_loss(scores: Sequence[TargetScore]) -> dict[str, float]:
    """Loss (nats per target token, pooled over the examples) and its perplexity."""
    loss = -sum(s.log_likelihood for s in scores) / sum(s.num_tokens for s in scores)
    return {"loss": loss, "perplexity": report.perplexity(loss)}
