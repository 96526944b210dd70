"""Supervised fine-tuning: weighted next-token cross-entropy on the response tokens (train/losses.py).

The per-token weights and the denominator come from the whole global batch (`config.loss.normalization`:
"tokens" or "sequences"), so the loss of micro-batches adds up to the full-batch loss exactly.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flan_jax.data.packing import BATCH_KEYS as DECODER_FEATURES  # the packed batch of design.md §4
from flan_jax.train import losses
from flan_jax.train.objectives import register_objective
from flan_jax.train.objectives.base import Objective, ObjectiveContext, Prepared

_WEIGHTS = "token_loss_weights"  # added by prepare(): loss_weights normalised over the global batch


@register_objective("sft")
class SFT(Objective):
    features = DECODER_FEATURES

    def __init__(self, config):
        super().__init__(config)
        self.loss_config = config.loss
        self.use_prefix = bool(config.data.prefix_lm)

    def prepare(self, batch: Mapping[str, jax.Array]) -> Prepared:
        weights, denominator = losses.token_weights(batch, self.loss_config.normalization)
        return Prepared(
            features={_WEIGHTS: weights},
            denominator=denominator,
            metrics={"loss_weight_sum": jnp.sum(batch["loss_weights"].astype(jnp.float32))},
        )

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        model = ctx.model
        inputs = dict(
            positions=batch["positions"],
            segment_ids=batch["segment_ids"],
            prefix_mask=batch["prefix_mask"] if self.use_prefix else None,
        )
        weights = batch[_WEIGHTS]
        # The loss owns the head matmul (faster backward), unless the model soft-caps its logits
        # (Gemma 2), which only its __call__ applies.
        if hasattr(model, "hidden_states") and not getattr(getattr(model, "cfg", None), "final_softcap", 0.0):
            hidden, head = model.hidden_states(batch["input_tokens"], **inputs)
            return losses.weighted_head_loss_sum(hidden, head, batch, weights, self.loss_config), {}
        logits = model(batch["input_tokens"], **inputs)
        return losses.weighted_loss_sum(logits, batch, weights, self.loss_config), {}
