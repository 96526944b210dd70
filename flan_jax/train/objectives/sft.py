"""Supervised fine-tuning: weighted next-token cross-entropy on the response tokens (train/losses.py).

The per-token weights and the denominator come from the whole global batch (`config.loss.normalization`:
"tokens" or "sequences"), so the loss of micro-batches adds up to the full-batch loss exactly.

Every model family trains through the same code: the family's feature converter
(flan_jax.data.converters) names the batch features, which of them the model call takes
(`model_features`), and the predicted stream the loss reads (`loss_keys`: targets, loss weights,
segment ids; the decoder's `target_tokens`, T5's `decoder_target_tokens`, ...).
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flan_jax.data import converters
from flan_jax.data.packing import BATCH_KEYS as DECODER_FEATURES  # the packed batch of design.md §4
from flan_jax.train import losses
from flan_jax.train.objectives import register_objective
from flan_jax.train.objectives.base import Objective, ObjectiveContext, Prepared

_WEIGHTS = "token_loss_weights"  # added by prepare(): loss_weights normalised over the global batch


@register_objective("sft")
class SFT(Objective):
    features = DECODER_FEATURES  # the decoder's; an instance lists its family's converter's

    def __init__(self, config):
        super().__init__(config)
        self.loss_config = config.loss
        self.use_prefix = bool(config.data.prefix_lm)
        self.converter = converters.for_model_config(config.model)
        self.features = tuple(self.converter.batch_keys)

    def _loss_view(self, batch: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """The predicted stream under the decoder's names (what train/losses.py reads)."""
        targets, weights, segments = self.converter.loss_keys
        return {"target_tokens": batch[targets], "loss_weights": batch[weights], "segment_ids": batch[segments]}

    def prepare(self, batch: Mapping[str, jax.Array]) -> Prepared:
        view = self._loss_view(batch)
        weights, denominator = losses.token_weights(view, self.loss_config.normalization)
        return Prepared(
            features={_WEIGHTS: weights},
            denominator=denominator,
            metrics={"loss_weight_sum": jnp.sum(view["loss_weights"].astype(jnp.float32))},
        )

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        model = ctx.model
        inputs = self.converter.model_features(batch, prefix_lm=self.use_prefix, rng=ctx.rng)
        view = self._loss_view(batch)
        weights = batch[_WEIGHTS]
        # The loss owns the head matmul (faster backward), unless the model soft-caps its logits
        # (Gemma 2), which only its __call__ applies.
        if hasattr(model, "hidden_states") and not getattr(getattr(model, "cfg", None), "final_softcap", 0.0):
            hidden, head = model.hidden_states(**inputs)
            return losses.weighted_head_loss_sum(hidden, head, view, weights, self.loss_config), {}
        logits = model(**inputs)
        return losses.weighted_loss_sum(logits, view, weights, self.loss_config), {}
