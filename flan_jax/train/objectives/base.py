"""What an objective is: the one part of a training step that differs between SFT, reward models,
DPO-style preference tuning and RL.

The trainer (train/step.py) owns everything else: mesh, optimizer, clipping, micro-batches,
non-finite handling, checkpoints, resume, metrics. An objective says which batch features it
needs and computes its loss in two stages, so gradients accumulated over micro-batches equal the
full-batch gradient exactly:

  prepare(batch)            on the WHOLE global batch, before micro-batching, without the model:
                            per-row / per-token arrays (e.g. normalised loss weights) added to the
                            batch, the float32 denominator of the loss, and metrics of the batch
                            itself (e.g. how many tokens carry loss).
  loss_sum(ctx, batch)      per micro-batch (a subset of whole rows): the sum of the loss terms and
                            sums of metrics. The step adds both over micro-batches and divides them
                            by the denominator.

Micro-batches and processes split the batch by whole rows only, so an objective whose examples
span several segments (a preference pair: chosen and rejected) keeps them in one row.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any, ClassVar

import jax
from flax import nnx

from flan_jax.model import lora
from flan_jax.train.state import ModelParts


@dataclasses.dataclass(frozen=True)
class Prepared:
    """`Objective.prepare`'s result (see the module docstring)."""

    features: dict[str, jax.Array]
    denominator: jax.Array
    metrics: dict[str, jax.Array] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class ObjectiveContext:
    """What `loss_sum` may use besides the batch.

    `model` is differentiated (the trained parameters merged with a frozen base, if any), with
    LoRA dropout on; `frozen(name)` builds the module of a frozen slot of the train state under
    `stop_gradient` (deterministic); `rng` is this step's (and micro-batch's) key for dropout or
    sampling.
    """

    parts: ModelParts
    params: Any
    frozen_params: Mapping[str, Any]
    rng: jax.Array

    @property
    def model(self) -> nnx.Module:
        model = self.parts.merge(self.params, self.frozen_params.get("base"))
        return lora.train_mode(model, self.rng)  # adapter dropout draws from this step's key

    def frozen(self, name: str) -> nnx.Module:
        if name not in self.frozen_params:
            raise KeyError(
                f"The train state has no frozen slot {name!r} (it has {sorted(self.frozen_params)}); "
                "the objective must list it in `frozen_slots`"
            )
        params = jax.lax.stop_gradient(self.frozen_params[name])
        base = self.frozen_params.get("base")
        return self.parts.merge(params, None if base is None else jax.lax.stop_gradient(base))


class Objective:
    """Base class of the objectives; subclasses register with `objectives.register_objective`."""

    name: ClassVar[str] = ""
    features: ClassVar[tuple[str, ...]] = ()  # batch keys it needs (check_batch names what is missing)
    frozen_slots: ClassVar[tuple[str, ...]] = ()  # frozen parameter sets it reads ("reference", ...)
    model_heads: ClassVar[tuple[str, ...]] = ()  # extra output heads the model must carry ("score", ...)

    def __init__(self, config: Any):
        self.config = config

    def prepare(self, batch: Mapping[str, jax.Array]) -> Prepared:
        raise NotImplementedError

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        raise NotImplementedError
