"""The reference log-prob cache of DPO / IPO: one pass of the frozen reference over the run's pairs.

Why: DPO compares the policy with the initial policy (the reference) on every pair. Running the
reference at every step keeps a second model in memory and costs one more forward pass per step;
its log-probs never change, so they are computed ONCE, before training, and cached in the workdir:

    DIR/reference_cache/pairs_<process>.npz   keys [N, 16] uint8, values [N, 2] float32 (no pickle)
    DIR/reference_cache/meta.json             fingerprint + the steps the cache covers

A pair is keyed by a digest of its token features (both halves, after truncation), so its value
does not depend on where the packer puts it. The pass replays the run's own data stream (same seed,
same row slots) for `train.num_steps` steps and runs the reference on each batch, exactly as a step
would. During training the pairs converter looks each pair up and puts the two values in the batch
as the per-token feature `reference_logps` (each response's value at its last position).

The cache is only valid for the reference weights, the data stream and the tokenizer it was made
with: `meta.json` holds their fingerprint, and a cache with another one is refused with a message
naming what changed (never silently reused). A resumed run reuses the cache; a run extended to
more steps computes only the steps not covered yet.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pathlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np

from flan_jax.data.converters.pairs import pair_key

CACHE_DIR = "reference_cache"
META = "meta.json"
_KEY_BYTES = 16  # blake2b digest size of `pair_key`
_VERSION = 1


class StaleReferenceCacheError(ValueError):
    """The workdir's reference cache was made with another reference, data stream or tokenizer."""


def tokenizer_fingerprint(tokenizer) -> str:
    """A digest of a tokenizer's vocabulary (every id's text) and special ids."""
    digest = hashlib.sha256(f"{tokenizer.vocab_size}|{tokenizer.bos_id}|{tokenizer.eos_id}|{tokenizer.pad_id}".encode())
    for i in range(tokenizer.vocab_size):
        digest.update(tokenizer.decode([i]).encode("utf-8", "surrogatepass") + b"\0")
    return digest.hexdigest()[:32]


class ReferenceCache:
    """{pair key: (chosen log-prob, rejected log-prob)} under the reference; see the module docstring."""

    def __init__(self, fingerprint: Mapping[str, Any], values: dict[bytes, tuple[float, float]] | None = None,
                 steps: int = 0):
        self.fingerprint = dict(fingerprint)
        self.values = values if values is not None else {}
        self.steps = steps

    def lookup(self, key: bytes) -> tuple[float, float] | None:
        """The pair's reference log-probs, None when the cache does not hold it.

        The packer featurizes pairs ahead of the rows it emits, so pairs past the last cached
        step are looked up too; they only matter if a batch holding one is emitted, which the
        pairs converter refuses (flan_jax.data.converters.pairs).
        """
        return self.values.get(key)

    # ------------------------------------------------------------------ files

    @staticmethod
    def directory(workdir: str | os.PathLike) -> pathlib.Path:
        return pathlib.Path(workdir) / CACHE_DIR

    @classmethod
    def load(cls, workdir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> ReferenceCache | None:
        """The workdir's cache (all processes' files), None if there is none; a stale one raises."""
        folder = cls.directory(workdir)
        meta_file = folder / META
        if not meta_file.is_file():
            return None
        meta = json.loads(meta_file.read_text())
        saved = meta.get("fingerprint", {})
        differing = sorted(k for k in set(saved) | set(fingerprint) if saved.get(k) != fingerprint.get(k))
        if differing or meta.get("version") != _VERSION:
            raise StaleReferenceCacheError(
                f"{folder} holds reference log-probs for another "
                + " and ".join(differing or ["cache version"])
                + " (" + "; ".join(f"{k}: cached {saved.get(k)!r}, this run {fingerprint.get(k)!r}" for k in differing)
                + "). Reusing them would train against the wrong reference. Delete that folder to recompute it, "
                "use another --workdir, or set config.objective.reference='model'."
            )
        values: dict[bytes, tuple[float, float]] = {}
        for file in sorted(folder.glob("pairs_*.npz")):
            with np.load(file, allow_pickle=False) as arrays:
                keys, numbers = arrays["keys"], arrays["values"]
            values.update((bytes(k), (float(v[0]), float(v[1]))) for k, v in zip(keys, numbers))
        return cls(fingerprint, values, steps=int(meta.get("steps", 0)))

    def save(self, workdir: str | os.PathLike) -> None:
        """Writes this process's pairs, then (process 0) the metadata; each file atomically (tmp + rename)."""
        folder = self.directory(workdir)
        folder.mkdir(parents=True, exist_ok=True)
        keys = np.frombuffer(b"".join(self.values), np.uint8).reshape(-1, _KEY_BYTES)
        numbers = np.asarray(list(self.values.values()), np.float32).reshape(-1, 2)
        target = folder / f"pairs_{jax.process_index()}.npz"
        tmp = folder / f".{target.stem}.tmp.npz"  # hidden: never read as a finished file
        np.savez(tmp, keys=keys, values=numbers)
        os.replace(tmp, target)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_processes("flan_jax_reference_cache_saved")
        if jax.process_index() == 0:
            meta = {"version": _VERSION, "fingerprint": self.fingerprint, "steps": self.steps, "pairs": len(self.values)}
            tmp_meta = folder / (META + ".tmp")
            tmp_meta.write_text(json.dumps(meta, indent=2) + "\n")
            os.replace(tmp_meta, folder / META)


def batch_pair_keys(batch: Mapping[str, np.ndarray]) -> list[list[bytes]]:
    """The keys of the pairs of each row of a (local) pairs batch, in pair order."""
    out = []
    for row in range(batch["pair_ids"].shape[0]):
        pair_ids = batch["pair_ids"][row]
        keys = []
        for k in range(1, int(pair_ids.max(initial=0)) + 1):
            where = pair_ids == k
            local = batch["segment_ids"][row][where] - 2 * (k - 1)
            keys.append(pair_key(batch["input_tokens"][row][where], batch["target_tokens"][row][where], local))
        out.append(keys)
    return out


def build(
    cache: ReferenceCache,
    *,
    num_steps: int,
    batches: Callable[[], Any],
    forward: Callable[[Mapping[str, np.ndarray]], tuple[np.ndarray, np.ndarray]],
    workdir: str | os.PathLike,
) -> ReferenceCache:
    """Extends `cache` to the first `num_steps` batches of the stream `batches()` and saves it.

    `forward(local batch) -> (chosen, rejected)`, each [local rows, max_pairs]: the reference's
    per-response log-probs. Steps the cache already covers are replayed without a forward pass.
    """
    if cache.steps >= num_steps:
        return cache
    started = time.perf_counter()
    iterator = batches()
    logging.info("Computing the reference log-probs of steps %d..%d (one pass of the reference)", cache.steps + 1, num_steps)
    for step in range(num_steps):
        batch = next(iterator)
        if step < cache.steps:
            continue
        chosen, rejected = forward(batch)
        for row, keys in enumerate(batch_pair_keys(batch)):
            for k, key in enumerate(keys):
                cache.values[key] = (float(chosen[row, k]), float(rejected[row, k]))
    cache.steps = num_steps
    cache.save(workdir)
    logging.info(
        "Reference log-probs of %d pairs (%d steps) computed in %.1fs and cached in %s",
        len(cache.values), num_steps, time.perf_counter() - started, ReferenceCache.directory(workdir),
    )
    return cache


def prepare(
    config: Any,
    workdir: str | os.PathLike,
    tokenizer,
    objective,
    *,
    parts,
    reference_params: Any,
    mesh,
    rules,
    make_iterator: Callable[[], Any],
) -> ReferenceCache:
    """The run's reference cache: loaded (and checked) from the workdir, extended to train.num_steps.

    `make_iterator()` gives the run's own pairs stream without reference values (a fresh iterator
    from step 0); `objective.response_log_probs` is the reference forward, jitted over `mesh`.
    """
    from jax.sharding import NamedSharding, PartitionSpec

    from flan_jax import sharding
    from flan_jax.train import partitioning, state as state_lib

    probe = make_iterator()
    fingerprint = {
        "reference": state_lib.fingerprint(reference_params),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "data": json.dumps(probe.get_state()["pipeline"], sort_keys=True),
    }
    cache = ReferenceCache.load(workdir, fingerprint) or ReferenceCache(fingerprint)
    num_steps = int(config.train.num_steps)
    if cache.steps >= num_steps:
        logging.info("Reusing the reference log-probs of %d pairs cached in %s", len(cache.values), ReferenceCache.directory(workdir))
        return cache

    batch_sharding = partitioning.batch_sharding(mesh, rules)
    replicated = NamedSharding(mesh, PartitionSpec())

    def reference_sums(params, batch):
        with sharding.use_rules(mesh, rules):
            sums = objective.response_log_probs(parts.merge(params), batch)
        return sums.chosen, sums.rejected

    jitted = jax.jit(reference_sums, out_shardings=(replicated, replicated))
    local_rows = int(config.data.batch_size) // jax.process_count()
    first = jax.process_index() * local_rows

    def forward(local_batch):
        with jax.set_mesh(mesh):
            chosen, rejected = jitted(reference_params, partitioning.global_batch(local_batch, batch_sharding))
        rows = slice(first, first + local_rows)
        return np.asarray(chosen)[rows], np.asarray(rejected)[rows]

    return build(cache, num_steps=num_steps, batches=lambda: probe, forward=forward, workdir=workdir)
