"""The training input pipeline: mixed examples -> features -> packed rows -> batches, resumable.

Why row slots: a run must see the same global batches whatever its process count (so a multi-host run
equals a single-host one, and a restart equals an uninterrupted run). Each row slot `r` of the global
batch (0 <= r < batch_size) therefore has its own pipeline, fed by the examples of the mixed stream whose
index is `r (mod batch_size)`:

    mixed stream[r::B] -> tokenize + truncate (counted) -> best-fit packing (OpenRows) -> row r of every batch

Process `p` of `P` owns the contiguous slots `[p*B/P, (p+1)*B/P)` and only ever reads, renders and
tokenizes the examples of its own slots. Concatenating the batches of all processes in process order gives
exactly the batch of a single-process run. Every stage is a grain dataset, so the state of an iterator is
a small JSON dict (stream positions, packer positions, overlong counts) that
`grain.checkpoint.CheckpointSave/CheckpointRestore` (inside an Orbax `ocp.args.Composite`) or
`get_state()/set_state()` save and restore exactly.

The mixed stream is infinite: a mixture's training stream already is, and a single task is read with
`num_epochs=None` (every epoch reshuffled).

Costs of the design: each local slot keeps up to `num_packing_bins` open rows, and a restored packer
re-renders and re-tokenizes the examples waiting in them. A checkpoint holds the states of this
process's slots, so resuming needs the same process count (a different device count is fine).
"""

from __future__ import annotations

import functools
import logging
import sys
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import numpy as np

from flan_jax.data import packing
from flan_jax.data.errors import DataError
from flan_jax.data.converters import DECODER
from flan_jax.data.features import FeatureConfig, FeatureStats, Outcome
from flan_jax.data.tokenizer import Tokenizer

_log = logging.getLogger(__name__)
_STATE_VERSION = 1
# Synchronous reads: parallelism comes from grain worker processes (config.data.worker_count), since
# tokenization holds the GIL and threads per row slot would multiply with the batch size.
_READ_OPTIONS = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)


# --------------------------------------------------------------------------- the mixed stream


def endless(examples: grain.MapDataset) -> grain.MapDataset:
    """`examples` repeated forever (unchanged when already infinite)."""
    if len(examples) == 0:
        raise ValueError("the training dataset is empty")
    if len(examples) >= sys.maxsize:
        return examples
    return examples.repeat()


def mixed_examples(data_config: Any, *, seed: int) -> grain.MapDataset:
    """The infinite stream of rendered training examples of `config.data.train_mixture`."""
    from flan_jax import data  # local import: keeps importing the loader cheap

    if not data_config.train_mixture:
        raise ValueError("config.data.train_mixture is empty: name a registered task or mixture")
    source = data.get(data_config.train_mixture)
    if isinstance(source, data.Task):  # a single task: every epoch reshuffled
        dataset = source.get_dataset(data_config.train_split, seed=seed, shuffle=True, num_epochs=None)
    else:  # a mixture's training stream is infinite already
        dataset = source.get_dataset(data_config.train_split, seed=seed, shuffle=True)
    return endless(dataset)


# --------------------------------------------------------------------------- tokenize + count + pack


class Featurizer:
    """Rendered example -> features (None when dropped), counting every outcome in `stats`.

    `converter` (flan_jax.data.converters) says how: decoder rows by default, encoder-decoder rows,
    preference pairs, ...
    """

    def __init__(self, tokenizer: Tokenizer, config: FeatureConfig, stats: FeatureStats, converter: Any = DECODER):
        self.tokenizer = tokenizer
        self.config = config
        self.stats = stats
        self.converter = converter

    def __call__(self, example: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        features, outcome = self.uncounted(example)
        self.stats.add(example.get("task", "?"), outcome, 0 if features is None else self.num_tokens(features))
        return features

    def num_tokens(self, features: Mapping[str, np.ndarray]) -> int:
        lengths = self.converter.lengths(features)
        return lengths if isinstance(lengths, int) else sum(lengths)

    def uncounted(self, example: Mapping[str, Any]) -> tuple[dict[str, np.ndarray] | None, Outcome]:
        try:
            return self.converter.featurize(example, self.tokenizer, self.config)
        except KeyError as error:
            raise DataError(
                f"rendered example has no {error.args[0]!r} (expected keys inputs, targets, task)",
                task=example.get("task"),
                field=str(error.args[0]),
            ) from error


class FeaturizeIterDataset(grain.IterDataset):
    """Rendered examples -> feature dicts, over-long ones truncated or dropped and counted (`pack=False`).

    The counts are part of the iterator state, so a restored run continues them exactly.
    """

    def __init__(self, parent: grain.IterDataset, featurizer: Featurizer):
        super().__init__(parent)
        self._featurizer = featurizer

    def __iter__(self) -> _FeaturizeIterator:
        return _FeaturizeIterator(self._parent.__iter__(), self._featurizer)

    def __str__(self) -> str:
        return f"FeaturizeIterDataset(seq_len={self._featurizer.config.seq_len})"


class _FeaturizeIterator(grain.DatasetIterator):
    def __init__(self, parent, featurizer: Featurizer):
        super().__init__(parent)
        self._featurizer = featurizer

    def __next__(self) -> dict[str, np.ndarray]:
        while True:
            features = self._featurizer(next(self._parent))
            if features is not None:
                return features

    def get_state(self) -> dict[str, Any]:
        return {"parent": self._parent.get_state(), "counts": self._featurizer.stats.snapshot()}

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._parent.set_state(state["parent"])
        self._featurizer.stats.restore(state["counts"])


class PackedRowsIterDataset(grain.IterDataset):
    """One row slot's stream (a MapDataset of rendered examples) -> featurized -> packed rows (`OpenRows`).

    Reads its examples by stream position, so the state is just the next position, the positions of
    the examples waiting in open rows (re-featurized on restore) and the counts: small and exact.
    """

    def __init__(self, source: grain.MapDataset, featurizer: Featurizer, *, num_open_rows: int):
        super().__init__(source)
        self._featurizer = featurizer
        self._num_open_rows = num_open_rows

    def set_slice(self, sl: slice, sequential_slice: bool = False) -> None:
        """Lets grain worker processes (`mp_prefetch`) each take every k-th example of the slot."""
        if sequential_slice:
            raise NotImplementedError("an endless stream cannot be cut into sequential slices")
        self._parents = (self._parent.slice(sl),)

    def __iter__(self) -> _PackedRowsIterator:
        return _PackedRowsIterator(self._parent, self._featurizer, self._num_open_rows)

    def __str__(self) -> str:
        return f"PackedRowsIterDataset(seq_len={self._featurizer.config.seq_len}, open_rows={self._num_open_rows})"


class _PackedRowsIterator(grain.DatasetIterator):
    def __init__(self, source: grain.MapDataset, featurizer: Featurizer, num_open_rows: int):
        super().__init__()
        self._source = source
        self._featurizer = featurizer
        converter = featurizer.converter
        self._rows = packing.OpenRows(
            converter.row_shape(featurizer.config), num_open_rows, lengths=converter.lengths, build=converter.build_row
        )
        self._next_index = 0
        self._flushed: list[dict[str, np.ndarray]] | None = None

    def __next__(self) -> dict[str, np.ndarray]:
        while self._next_index < len(self._source):
            index = self._next_index
            features = self._featurizer(self._source[index])
            self._next_index += 1
            if features is not None:
                row = self._rows.add(index, features)
                if row is not None:
                    return row
        if self._flushed is None:  # only a finite stream ends: emit what is still open
            self._flushed = self._rows.flush()
        if self._flushed:
            return self._flushed.pop(0)
        raise StopIteration

    def get_state(self) -> dict[str, Any]:
        if self._flushed is not None:
            raise ValueError("cannot checkpoint a finite slot stream after its end")
        return {
            "next_index": self._next_index,
            "open_rows": self._rows.keys(),
            "counts": self._featurizer.stats.snapshot(),
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        self._next_index = int(state["next_index"])
        self._featurizer.stats.restore(state["counts"])
        self._flushed = None
        reopened = []
        for keys in state["open_rows"]:  # rendering and tokenizing are deterministic: same features
            reopened.append([(int(key), self._featurizer.uncounted(self._source[int(key)])[0]) for key in keys])
        self._rows.restore(reopened)


# --------------------------------------------------------------------------- batches of row slots


class TrainBatchDataset(grain.IterDataset):
    """Stacks one row from each local row slot's pipeline into a `[local_rows, seq_len]` batch."""

    def __init__(
        self,
        slot_rows: list[grain.IterDataset],
        *,
        slots: list[int],
        slot_stats: list[FeatureStats],
        fingerprint: dict[str, Any],
        batch_keys: tuple[str, ...] = packing.BATCH_KEYS,
    ):
        super().__init__(slot_rows)
        self.slots = slots
        self.slot_stats = slot_stats
        self.fingerprint = fingerprint
        self.batch_keys = batch_keys

    def __iter__(self) -> TrainIterator:
        return TrainIterator(
            [parent.__iter__() for parent in self._parents],
            slots=self.slots,
            slot_stats=self.slot_stats,
            fingerprint=self.fingerprint,
            batch_keys=self.batch_keys,
        )

    def __str__(self) -> str:
        return f"TrainBatchDataset(slots={self.slots[0]}..{self.slots[-1]})"


class TrainIterator(grain.DatasetIterator):
    """Yields batch dicts (docs/design.md §4); `get_state`/`set_state` and `stats` (overlong counts)."""

    def __init__(
        self,
        parents,
        *,
        slots: list[int],
        slot_stats: list[FeatureStats],
        fingerprint: dict[str, Any],
        batch_keys: tuple[str, ...] = packing.BATCH_KEYS,
    ):
        super().__init__(parents)
        self._batch_keys = batch_keys
        self._slots = slots
        self._slot_stats = slot_stats
        self._fingerprint = fingerprint
        self._next_overlong_report = 1

    @property
    def stats(self) -> FeatureStats:
        """Per-task counts of the examples this process consumed (kept, truncated, dropped, tokens)."""
        merged = FeatureStats()
        for stats in self._slot_stats:
            merged.merge(stats)
        return merged

    def __next__(self) -> dict[str, np.ndarray]:
        rows = [next(parent) for parent in self._parents]
        batch = {key: np.stack([row[key] for row in rows]) for key in self._batch_keys}
        self._report_overlong()
        return batch

    def _report_overlong(self) -> None:
        """Logs the overlong counts each time they reach a new power of two (few lines, never silent)."""
        overlong = sum(stats.total().overlong for stats in self._slot_stats)
        if overlong >= self._next_overlong_report:
            while self._next_overlong_report <= overlong:
                self._next_overlong_report *= 2
            _log.warning(
                "data: over-long examples (seq_len %d, policy %r) so far: %s",
                self._fingerprint["seq_len"],
                self._fingerprint["overlong"],
                self.stats.summary(),
            )

    def get_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "pipeline": self._fingerprint,
            "slots": {str(slot): parent.get_state() for slot, parent in zip(self._slots, self._parents)},
        }

    def set_state(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"data iterator state has version {state.get('version')}, expected {_STATE_VERSION}")
        if state["pipeline"] != self._fingerprint:
            changed = sorted(
                key
                for key in set(state["pipeline"]) | set(self._fingerprint)
                if state["pipeline"].get(key) != self._fingerprint.get(key)
            )
            raise ValueError(
                "the data iterator in the checkpoint was made with different settings "
                + ", ".join(f"{k}: {state['pipeline'].get(k)!r} -> {self._fingerprint.get(k)!r}" for k in changed)
                + "; resuming would change the data stream"
            )
        # A state may hold more slots than this process owns (merged from a run with fewer
        # processes, see `merge_process_states`); it must hold all of them.
        missing = sorted(set(self._slots) - {int(slot) for slot in state["slots"]})
        if missing:
            raise ValueError(
                f"the data iterator state lacks row slots {missing} that this process owns "
                f"({self._slots[0]}..{self._slots[-1]}); was it saved with another global batch size?"
            )
        for slot, parent in zip(self._slots, self._parents):
            parent.set_state(state["slots"][str(slot)])
        overlong = sum(stats.total().overlong for stats in self._slot_stats)
        self._next_overlong_report = 1
        while self._next_overlong_report <= overlong:
            self._next_overlong_report *= 2


def merge_process_states(states: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """One state holding the row slots of all processes' states (all from one checkpoint).

    Row slots, not processes, carry the data stream, so a run can resume under another process
    count: each process then takes the slots it owns from the merged state.
    """
    if not states:
        raise ValueError("no data iterator states to merge")
    first = states[0]
    for other in states[1:]:
        if other.get("version") != first.get("version") or other.get("pipeline") != first.get("pipeline"):
            raise ValueError("data iterator states of one checkpoint disagree on their version or pipeline settings")
    slots: dict[str, Any] = {}
    for state in states:
        slots.update(state["slots"])
    return {"version": first.get("version"), "pipeline": first.get("pipeline"), "slots": slots}


# --------------------------------------------------------------------------- entry points


def _process_slots(batch_size: int, process_index: int | None, process_count: int | None) -> list[int]:
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index={process_index} is outside 0..{process_count - 1}")
    if batch_size % process_count:
        raise ValueError(
            f"config.data.batch_size={batch_size} must be divisible by the process count {process_count}"
        )
    rows = batch_size // process_count
    return list(range(process_index * rows, (process_index + 1) * rows))


def make_train_dataset(
    data_config: Any,
    tokenizer: Tokenizer,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    examples: grain.MapDataset | None = None,
    converter: Any = DECODER,
) -> TrainBatchDataset:
    """The batches of this process as a grain dataset (see `make_train_iterator`)."""
    if examples is None:
        examples = mixed_examples(data_config, seed=seed)
        source_name = f"{data_config.train_mixture}:{data_config.train_split}"
    else:
        examples = endless(examples)
        source_name = "<examples given to the loader>"
    feature_config = FeatureConfig.from_data_config(data_config)
    converter.check_tokenizer(tokenizer)
    row_shape = converter.row_shape(feature_config)
    global_rows = int(data_config.batch_size)
    slots = _process_slots(global_rows, process_index, process_count)
    slot_rows, slot_stats = [], []
    for slot in slots:
        stats = FeatureStats()
        featurizer = Featurizer(tokenizer, feature_config, stats, converter)
        slot_examples = examples[slot::global_rows]
        if data_config.pack:
            rows = PackedRowsIterDataset(slot_examples, featurizer, num_open_rows=int(data_config.num_packing_bins))
        else:
            features = FeaturizeIterDataset(slot_examples.to_iter_dataset(_READ_OPTIONS), featurizer)
            rows = features.map(functools.partial(converter.pad_one, row_shape=row_shape))
        slot_rows.append(rows)
        slot_stats.append(stats)
    fingerprint = {
        "source": source_name,
        "seed": int(seed),
        "batch_size": global_rows,
        "seq_len": feature_config.seq_len,
        "pack": bool(data_config.pack),
        "num_packing_bins": int(data_config.num_packing_bins),
        "overlong": feature_config.overlong,
        "loss_on_inputs": feature_config.loss_on_inputs,
        "vocab_size": int(tokenizer.vocab_size),
    }
    if converter.name != DECODER.name:  # (absent for decoder rows, so checkpoints of earlier versions still resume)
        fingerprint["converter"] = converter.name
        if not isinstance(row_shape, int):  # several row streams (T5's encoder and decoder rows)
            fingerprint["row_shape"] = list(row_shape)
    return TrainBatchDataset(
        slot_rows, slots=slots, slot_stats=slot_stats, fingerprint=fingerprint, batch_keys=tuple(converter.batch_keys)
    )


def make_train_iterator(
    data_config: Any,
    tokenizer: Tokenizer,
    *,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
    examples: grain.MapDataset | None = None,
    converter: Any = DECODER,
) -> grain.DatasetIterator:
    """An endless iterator of this process's batches: dicts of `[batch_size / process_count, seq_len]` arrays.

    The batches depend only on the seed and the data config (not on the process count). `examples`
    replaces the registered `config.data.train_mixture` (tests, benchmarks); `converter`
    (flan_jax.data.converters) chooses the batch layout (decoder rows by default; the family's, e.g.
    T5's encoder-decoder rows, or an objective's, e.g. "pairs" for preference objectives). With
    `config.data.worker_count > 0`, batches are built in that many grain worker processes; the stream
    is then a different (equally deterministic) interleaving, and `stats` lives in the workers.
    """
    dataset = make_train_dataset(
        data_config,
        tokenizer,
        seed=seed,
        process_index=process_index,
        process_count=process_count,
        examples=examples,
        converter=converter,
    )
    if data_config.worker_count > 0:
        return iter(dataset.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(data_config.worker_count))))
    return iter(dataset)


__all__ = ["make_train_iterator", "make_train_dataset", "mixed_examples", "TrainIterator", "endless"]
