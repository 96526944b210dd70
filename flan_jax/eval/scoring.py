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

from flan_jax.data import chat_features, converters
from flan_jax.data.converters import DECODER
from flan_jax.data.features import FeatureConfig
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
    """What a decoder conditions on, laid out as in training (design.md §4): BOS + the instruction
    tokens, or the chat template's rendering with its generation prompt (a conversation, or any
    prompt when the tokenizer renders chats; data/chat_features.py).

    Scoring and generation take each family's own layout from its feature converter
    (`converters.for_model(model).prompt_ids`; T5: the instruction + EOS).
    """
    return DECODER.prompt_ids(tokenizer, inputs)


def encode_target(tokenizer, target: str, *, add_eos: bool = True) -> list[int]:
    """The response tokens, ending in EOS like training targets (so an option must also *end*)."""
    return DECODER.target_ids(tokenizer, target, add_eos=add_eos)


def _next_power_of_two(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def cut_prompt(prompt: Sequence[int], max_tokens: int) -> list[int]:
    """BOS + the first and last parts of the instruction, `max_tokens` tokens in all (decoder prompts)."""
    return DECODER.cut_prompt(prompt, max_tokens)


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


def _pack_streams(lengths: Sequence[tuple[int, ...]], row_shape: tuple[int, ...]) -> list[list[int]]:
    """Best-fit decreasing over several streams (encoder and decoder rows): the members of each row.

    Largest first (by their share of the row), each into the row it leaves least free, or a new row.
    """
    order = sorted(range(len(lengths)), key=lambda i: -sum(n / cap for n, cap in zip(lengths[i], row_shape)))
    free: list[list[int]] = []
    members: list[list[int]] = []
    for i in order:
        best, best_room = -1, float("inf")
        for r, room in enumerate(free):
            if all(n <= f for n, f in zip(lengths[i], room)):
                left = sum((f - n) / cap for n, f, cap in zip(lengths[i], room, row_shape))
                if left < best_room:
                    best, best_room = r, left
        if best < 0:
            best = len(free)
            free.append(list(row_shape))
            members.append([])
        free[best] = [f - n for n, f in zip(lengths[i], free[best])]
        members[best].append(i)
    return members


def row_members(lengths: Sequence, row_shape) -> list[list[int]]:
    """The sequences of each packed row, in their order inside the row."""
    if isinstance(row_shape, int):
        rows, offsets = _pack(lengths, row_shape)
        members: list[list[int]] = [[] for _ in range(max(rows) + 1)]
        for i in sorted(range(len(lengths)), key=lambda i: (rows[i], offsets[i])):
            members[rows[i]].append(i)
        return members
    return _pack_streams(lengths, row_shape)


def row_shape(data_config, converter) -> int | tuple[int, ...]:
    """The longest rows scoring may use: the training rows of `config.data` in the converter's layout."""
    return converter.row_shape(FeatureConfig.from_data_config(data_config))


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3))
def _target_log_probs(graphdef, targets_key: str, prefix_lm: bool, converter_name: str, state, batch):
    model = nnx.merge(graphdef, state)
    converter = converters.get_converter(converter_name)
    logits = model(**converter.model_features(batch, prefix_lm=prefix_lm))
    # log p(target) = logit[target] - logsumexp(logits): no second [B, L, vocab] array is built.
    logits = logits.astype(jnp.float32)
    target_logits = jnp.take_along_axis(logits, batch[targets_key][..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def score_targets(
    model: nnx.Module,
    sequences: Sequence[tuple[Sequence[int], Sequence[int]]],
    *,
    max_len: int | tuple[int, ...],
    batch_rows: int = 16,
    prefix_lm: bool = False,
) -> list[TargetScore]:
    """Log-likelihood of each target given its prompt, in packed, batched forward passes.

    `sequences` holds (prompt_ids, target_ids) pairs in the model family's layout (its feature
    converter's `prompt_ids` / `target_ids`; a decoder's prompt starts with BOS, see `encode_prompt`).
    A decoder sees prompt + target[:-1] in one row; T5's encoder sees the prompt and its decoder the
    shifted target. `max_len` is the converter's row shape (`row_shape(config.data, converter)`;
    an int for a decoder). With `prefix_lm`, the prompt positions get `prefix_mask=1` (bidirectional), as in training.
    """
    if not sequences:
        return []
    converter = converters.for_model(model)
    scored = [converter.score_features(p, t, max_len) for p, t in sequences]
    num_truncated = sum(truncated for _, _, truncated in scored)
    if num_truncated:
        logging.info("scoring: %d of %d sequences cut to max_len=%s", num_truncated, len(scored), max_len)
    lengths = [converter.lengths(features) for features, _, _ in scored]
    stream = converter.loss_keys[0]  # the predicted stream: spans index into it
    if isinstance(max_len, int):
        longest = max(lengths)
        shape: int | tuple[int, ...] = min(max(_MIN_ROW_LEN, _next_power_of_two(longest)), max(max_len, longest))
        predicted = lambda n: n  # noqa: E731
    else:
        longest_per = [max(n[d] for n in lengths) for d in range(len(max_len))]
        shape = tuple(min(max(_MIN_ROW_LEN, _next_power_of_two(m)), max(cap, m)) for m, cap in zip(longest_per, max_len))
        predicted = lambda n: n[-1]  # noqa: E731  (encoder-decoder: the decoder stream is last)
    members = row_members(lengths, shape)
    rows = [converter.build_row([scored[i][0] for i in row], shape) for row in members]
    placed = {}  # sequence -> (row, offset along the predicted stream)
    for r, row in enumerate(members):
        offset = 0
        for i in row:
            placed[i] = (r, offset)
            offset += predicted(lengths[i])
    arrays = {key: np.stack([row[key] for row in rows]) for key in converter.batch_keys}
    num_rows = len(rows)

    graphdef, state = nnx.split(model)
    token_log_probs = np.zeros(arrays[stream].shape, np.float32)
    start = 0
    while start < num_rows:
        # Fixed batch shapes: full batches of `batch_rows`, then a power-of-two remainder.
        size = min(batch_rows, _next_power_of_two(num_rows - start))
        stop = min(start + size, num_rows)

        def padded(a, start=start, stop=stop, size=size):
            out = np.zeros((size, *a.shape[1:]), a.dtype)
            out[: stop - start] = a[start:stop]
            return out

        result = _target_log_probs(
            graphdef, stream, bool(prefix_lm), converter.name, state, {key: padded(a) for key, a in arrays.items()}
        )
        token_log_probs[start:stop] = np.asarray(result)[: stop - start]
        start = stop

    scores = []
    for i, (_, (first, end), truncated) in enumerate(scored):
        r, o = placed[i]
        log_likelihood = float(token_log_probs[r, o + first:o + end].sum(dtype=np.float64))
        scores.append(TargetScore(log_likelihood, end - first, truncated))
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
    max_len: int | tuple[int, ...],
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
    converter = converters.for_model(model)
    sequences, owners = [], []
    for index, example in enumerate(examples):
        options = list(example.get("options") or [])
        if not options:
            raise ValueError(
                f"rank classification needs answer options, but example {index} of task "
                f"{example.get('task', '?')!r} has an empty 'options' field"
            )
        prompt = converter.prompt_ids(tokenizer, chat_features.eval_prompt(example))
        for option in options:
            sequences.append((prompt, converter.target_ids(tokenizer, option)))
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
    max_len: int | tuple[int, ...],
    batch_rows: int = 16,
    prefix_lm: bool = False,
) -> dict[str, float]:
    """Mean negative log-likelihood per target token (training's "tokens" normalization) and perplexity."""
    sequences = target_sequences(tokenizer, examples, converters.for_model(model))
    return mean_loss(score_targets(model, sequences, max_len=max_len, batch_rows=batch_rows, prefix_lm=prefix_lm))


def target_sequences(tokenizer, examples: Sequence[dict], converter=DECODER) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, target ids) of each rendered example in `converter`'s layout, as `score_targets` takes them."""
    return [(converter.prompt_ids(tokenizer, chat_features.eval_prompt(ex)), converter.target_ids(tokenizer, ex["targets"]))
            for ex in examples]


def mean_loss(scores: Sequence[TargetScore]) -> dict[str, float]:
    """Loss (nats per target token, pooled over the examples) and its perplexity."""
    loss = -sum(s.log_likelihood for s in scores) / sum(s.num_tokens for s in scores)
    return {"loss": loss, "perplexity": report.perplexity(loss)}
