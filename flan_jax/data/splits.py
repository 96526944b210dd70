"""A validation split carved deterministically out of a source that ships only one split.

Many datasets (the P3/T0 files, the FLAN CoT TSVs, a benchmark's single JSONL) are one file, but
evaluating a task the model trained on needs examples it did not train on. Every `every`-th record
of `base_split` (indices 0, every, 2*every, ...) goes to the validation split and the rest to the
training split, so the two never overlap, even a file of a few records gets a validation example,
and the split depends on no seed, machine or library version. The base's other splits (a
separately shipped "test", say) are passed through unchanged.

Each carved record keeps its origin in the base (file, line, record number in the file), so an
error in a carved split names the line of the original file, not an index in the split.

    source = data.CarvedSplits(data.JsonlSource({"train": "{data_dir}/bench/all.jsonl"}), every=10)
    source.splits   # ("train", "validation")
"""

from __future__ import annotations

from flan_jax.data.sources import Records, Source


class CarvedSplits(Source):
    """Wraps `base` so that its split `base_split` becomes `train_split` + `validation_split`."""

    def __init__(
        self,
        base: Source,
        *,
        every: int = 10,
        base_split: str = "train",
        train_split: str = "train",
        validation_split: str = "validation",
    ):
        super().__init__()
        if not isinstance(base, Source):
            raise TypeError(f"CarvedSplits needs a flan_jax.data Source, got {type(base).__name__}")
        if every < 2:
            raise ValueError(f"every must be >= 2, got {every}")
        if train_split == validation_split:
            raise ValueError(f"train_split and validation_split are both {train_split!r}")
        self.base = base
        self.every = every
        self.base_split = base_split
        self.train_split = train_split
        self.validation_split = validation_split
        self.in_memory = base.in_memory

    @property
    def splits(self) -> tuple[str, ...]:
        carved = (self.train_split, self.validation_split)
        if self.base_split not in self.base.splits:
            return carved  # records() then raises naming the base and its splits
        others = tuple(s for s in self.base.splits if s != self.base_split and s not in carved)
        return carved + others

    def _load(self, split: str) -> Records:
        if split not in (self.train_split, self.validation_split):
            return self.base.records(split)
        records = self.base.records(self.base_split)
        # Share the base's reports (empty files, skipped records) so users and tasks see them here.
        self.empty_files = self.base.empty_files
        self.skipped = self.base.skipped
        in_validation = split == self.validation_split
        indices = [i for i in range(len(records)) if (i % self.every == 0) == in_validation]
        origins = []
        for i in indices:
            where = records.where(i)
            origins.append((where["file"], where.get("line"), where["record"]))
        return Records([records[i] for i in indices], f"{self.short_name()}:{split}", origins=origins)

    def short_name(self) -> str:
        return f"CarvedSplits({self.base.short_name()})"

    def __repr__(self) -> str:
        names = "" if (self.train_split, self.validation_split) == ("train", "validation") else (
            f", train_split={self.train_split!r}, validation_split={self.validation_split!r}"
        )
        return f"CarvedSplits({self.base!r}, every={self.every}, base_split={self.base_split!r}{names})"
