"""A validation split carved deterministically out of a source that ships only one split.

The P3/T0 files and the FLAN CoT TSVs are training data only, but FLAN-style evaluation of
seen tasks needs examples the model did not train on. Every `every`-th record (indices 0,
every, 2*every, ...) goes to "validation" and the rest to "train", so the two never overlap,
even a file of a few records gets a validation example, and the split does not depend on
any seed or on the machine.
"""

from __future__ import annotations

from flan_jax.data.sources import Source


class CarvedSplits(Source):
    """Wraps `base` (split `base_split`) into "train" and "validation" splits."""

    def __init__(self, base: Source, *, every: int = 10, base_split: str = "train"):
        super().__init__()
        if every < 2:
            raise ValueError(f"every must be >= 2, got {every}")
        self.base = base
        self.every = every
        self.base_split = base_split

    @property
    def splits(self) -> tuple[str, ...]:
        return ("train", "validation")

    def _load(self, split: str) -> list[dict]:
        records = self.base.records(self.base_split)
        # Share the base's reports (empty files, skipped records) so users and tasks see them here.
        self.empty_files = self.base.empty_files
        self.skipped = self.base.skipped
        in_validation = split == "validation"
        return [record for index, record in enumerate(records) if (index % self.every == 0) == in_validation]

    def short_name(self) -> str:
        return f"CarvedSplits({self.base.short_name()})"

    def __repr__(self) -> str:
        return f"CarvedSplits({self.base!r}, every={self.every}, base_split={self.base_split!r})"
