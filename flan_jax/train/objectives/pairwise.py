"""What the preference objectives share: pairs batches, per-pair normalisation, the reference log-probs.

Every preference objective trains on the pairs converter's batches (flan_jax.data.converters.pairs:
both halves of a pair in one row), so micro-batches and processes never split a pair. The loss is
the MEAN over the pairs of the global batch: `prepare` counts the valid pairs of the whole batch
(the denominator), `loss_sum` sums per-pair losses of its rows, so accumulated micro-batches give
exactly the full-batch loss and gradient.

The reference log-probabilities of the DPO family come from one of three places
(`config.objective.reference`):

  "cache"         a pass of the frozen reference (the initial policy) over the run's pairs before
                  training, cached in the workdir (flan_jax.train.reference_cache); each batch then
                  carries them as the per-token feature `reference_logps`, and training holds one model.
  "model"         the frozen "reference" slot of the train state, run on the fly at every step (the
                  fallback: no pre-pass, one more forward per step, two models in memory; with LoRA
                  the slot is a copy of the initial adapters only, the base is shared).
  "adapters_off"  LoRA runs: the policy with its adapters switched off (model/lora.py), which is the
                  initial policy while the adapters start at B = 0. One copy of the weights, no slot,
                  no pre-pass; one more forward (of the base) per step.
  "auto"          (default) "adapters_off" where it is exact (LoRA adapters starting from zero,
                  only adapters trained), else "cache".
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flan_jax.data.converters.pairs import BATCH_KEYS as PAIR_FEATURES
from flan_jax.data.converters.pairs import REFERENCE_FEATURE
from flan_jax.train import losses, pairs
from flan_jax.train.objectives.base import Objective, ObjectiveContext, Prepared

REFERENCE_SOURCES = ("auto", "cache", "model", "adapters_off")
ADAPTERS_OFF = "adapters_off"


class PairwiseObjective(Objective):
    """Base of the reward-model and DPO-family objectives (see the module docstring)."""

    features = PAIR_FEATURES
    feature_converter = "pairs"

    def __init__(self, config: Any):
        super().__init__(config)
        self.settings = config.objective
        self.use_prefix = bool(config.data.prefix_lm)

    def prepare(self, batch: Mapping[str, jax.Array]) -> Prepared:
        count = jnp.sum(pairs.valid_pairs(batch).astype(jnp.float32))
        return Prepared(features={}, denominator=jnp.maximum(count, 1.0), metrics={"pairs": count})

    def model_inputs(self, batch: Mapping[str, jax.Array]) -> dict[str, Any]:
        return dict(
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            prefix_mask=batch["prefix_mask"] if self.use_prefix else None,
        )

    def response_log_probs(self, model, batch: Mapping[str, jax.Array]) -> pairs.PerResponse:
        """The model's log-prob of each response (sum over its tokens) from one forward pass.

        Through `losses.head_cross_entropy` when the model exposes its hidden states, so the head
        matmul's backward is the fused one SFT uses (no [rows, L, vocab] scatter).
        """
        if hasattr(model, "hidden_states"):
            hidden, head = model.hidden_states(batch["input_tokens"], **self.model_inputs(batch))
            token_logps = -losses.head_cross_entropy(hidden, head, batch["target_tokens"])
            return pairs.response_sums(token_logps, batch)
        return pairs.response_log_probs(model(batch["input_tokens"], **self.model_inputs(batch)), batch)

    def pair_sums(self, valid: jax.Array, values: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Sums over the valid pairs of per-pair metric arrays (the step divides by the pair count)."""
        return {name: jnp.sum(jnp.where(valid, value.astype(jnp.float32), 0.0)) for name, value in values.items()}


def reference_source(config: Any) -> str:
    """`config.objective.reference` resolved to "cache", "model" or "adapters_off" (module docstring).

    "adapters_off" needs a LoRA run whose policy starts as its base: adapters from the seed
    (B = 0; not `lora.init_from`, which starts them elsewhere) and nothing but adapters trained
    (`trainable.paths` / `logical_axes` would move base weights away from the reference).
    """
    source = str(config.objective.reference)
    if source not in REFERENCE_SOURCES:
        raise ValueError(f"config.objective.reference={source!r}: expected one of {REFERENCE_SOURCES}")
    why_not = _adapters_off_impossible(config)
    if source == "auto":
        return "cache" if why_not else ADAPTERS_OFF
    if source == ADAPTERS_OFF and why_not:
        raise ValueError(
            f"config.objective.reference='adapters_off' needs {why_not}: the policy with its adapters switched "
            "off would not be the initial policy. Use 'cache' or 'model'."
        )
    return source


def _adapters_off_impossible(config: Any) -> str:
    """Why the base alone is not this run's initial policy ("" when it is)."""
    section = config.get("lora")
    if section is None or int(section.get("rank", 0)) <= 0:
        return "a LoRA run (config.lora.rank > 0)"
    if section.get("init_from"):
        return f"adapters that start at zero (config.lora.init_from={section.init_from!r} starts them from a trained adapter)"
    trainable = config.get("trainable")
    if trainable is not None and (tuple(trainable.get("paths", ())) or tuple(trainable.get("logical_axes", ()))):
        return "only the adapters trained (config.trainable.paths / logical_axes also train base parameters)"
    return ""


def reference_log_probs(objective: PairwiseObjective, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> pairs.PerResponse:
    """The reference's log-prob of each response: from the batch's cached feature, the policy with
    its adapters switched off, or the frozen slot."""
    if REFERENCE_FEATURE in batch:
        return pairs.response_sums(batch[REFERENCE_FEATURE], batch)
    if getattr(objective, "reference", None) == ADAPTERS_OFF:
        return objective.response_log_probs(ctx.without_adapters(), batch)
    return objective.response_log_probs(ctx.frozen("reference"), batch)


__all__ = ["ADAPTERS_OFF", "PAIR_FEATURES", "PairwiseObjective", "REFERENCE_FEATURE", "reference_log_probs", "reference_source"]
