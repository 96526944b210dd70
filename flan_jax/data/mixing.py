"""Mixing rates and the mixed training stream.

FLAN mixes tasks "examples-proportionally with a cap": a task's rate is its number of examples,
capped so that huge datasets do not drown small ones; a temperature T > 1 flattens the rates further
(rate_i ∝ min(n_i, cap) ** (1 / T)). The stream itself is grain's deterministic weighted interleave
(`MapDataset.mix`) over per-task streams that are each shuffled and repeated (reshuffled every
epoch), so within an epoch no example is drawn twice and the whole stream is a function of the seed.
"""

from __future__ import annotations

import hashlib
import sys
from collections.abc import Mapping, Sequence

import grain

from flan_jax.data.errors import DataError


def normalise(rates: Mapping[str, float]) -> dict[str, float]:
    """Rates scaled to sum to 1; zero rates are dropped. Negative or all-zero rates raise DataError."""
    negative = {name: rate for name, rate in rates.items() if not rate >= 0}
    if negative:
        raise DataError(f"mixing rates must be >= 0, got {negative}")
    total = sum(rates.values())
    if total <= 0:
        raise DataError(f"all mixing rates are zero: {dict(rates)}")
    return {name: rate / total for name, rate in rates.items() if rate > 0}


def proportional_rates(
    counts: Mapping[str, int], *, cap: int | None = None, temperature: float = 1.0
) -> dict[str, float]:
    """Examples-proportional rates with an optional per-task cap and temperature (normalised).

    rate_i ∝ min(n_i, cap) ** (1 / temperature); tasks with no examples get no rate.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if cap is not None and cap <= 0:
        raise ValueError(f"cap must be > 0, got {cap}")
    raw = {}
    for name, n in counts.items():
        n = n if cap is None else min(n, cap)
        raw[name] = float(n) ** (1.0 / temperature) if n > 0 else 0.0
    return normalise(raw)


def stable_seed(seed: int, name: str) -> int:
    """A per-name seed in [0, 2**32) derived from (seed, name), stable across runs and machines."""
    digest = hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % 2**32


def mix(datasets: Mapping[str, grain.MapDataset], rates: Mapping[str, float]) -> grain.MapDataset:
    """Interleaves (infinite) datasets deterministically so each appears with frequency = its rate.

    Uses grain's `MapDataset.mix`, which places element k by integer arithmetic on the rates
    (random access, no sampler state), so checkpoints only need the position in the stream.
    """
    names = sorted(datasets)  # fixed order, independent of registration order
    missing = [name for name in names if name not in rates]
    if missing:
        raise DataError(f"no mixing rate for {missing}")
    if len(names) == 1:
        return datasets[names[0]]
    short = [name for name in names if len(datasets[name]) < sys.maxsize]
    if short:
        raise DataError(f"mixed datasets must be repeated infinitely; finite: {short}")
    return grain.MapDataset.mix([datasets[name] for name in names], [rates[name] for name in names])


def expected_counts(rates: Mapping[str, float], num_examples: int) -> dict[str, float]:
    """How many of `num_examples` stream examples each task is expected to supply."""
    return {name: rate * num_examples for name, rate in rates.items()}


def describe(rates: Mapping[str, float], counts: Mapping[str, int] | None = None) -> str:
    """A small text table of rates (and examples available), largest first, for logs and reports."""
    lines = []
    for name, rate in sorted(rates.items(), key=lambda item: (-item[1], item[0])):
        extra = "" if counts is None else f"  {counts.get(name, 0):>9,d} examples"
        lines.append(f"{rate:9.4%}  {name}{extra}")
    return "\n".join(lines)


__all__: Sequence[str] = ("normalise", "proportional_rates", "stable_seed", "mix", "expected_counts", "describe")
