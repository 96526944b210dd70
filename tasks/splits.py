"""Kept for task modules written against `tasks.splits`: the class is `flan_jax.data.CarvedSplits`."""

from flan_jax.data.splits import CarvedSplits

__all__ = ["CarvedSplits"]
