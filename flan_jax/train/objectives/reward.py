"""The reward model (InstructGPT's, Bradley-Terry): a scalar `score` head read at the last token of each response.

    loss = -log sigmoid(r_chosen - r_rejected - margin)        (config.objective.margin, default 0)

The score of a response is the `score` head (flan_jax.model.transformer, `heads=("score",)`) at the
last position of its half of the row, whose input is the response's last token: what transformers'
`*ForSequenceClassification` reads for `[BOS] prompt response` (the last non-padding token), so the
exported model scores as ours (flan_jax.convert.reward). Logged per step: loss, accuracy (share of
pairs with r_chosen > r_rejected), margin (mean r_chosen - r_rejected), rewards/chosen, rewards/rejected.
"""

from __future__ import annotations

from collections.abc import Mapping

import jax
import jax.numpy as jnp

from flan_jax.train import pairs, preference_losses
from flan_jax.train.objectives import register_objective
from flan_jax.train.objectives.base import ObjectiveContext
from flan_jax.train.objectives.pairwise import PairwiseObjective

SCORE_HEAD = "score"


def response_scores(model, batch: Mapping[str, jax.Array], model_inputs: dict) -> pairs.PerResponse:
    """The `score` head at the last position of each response: chosen / rejected [rows, max_pairs]."""
    hidden, _ = model.hidden_states(batch["input_tokens"], **model_inputs)
    scores = model.scalar_head(SCORE_HEAD, hidden)
    return pairs.response_sums(jnp.where(pairs.last_response_positions(batch), scores, 0.0), batch)


@register_objective("reward_model")
class RewardModel(PairwiseObjective):
    model_heads = (SCORE_HEAD,)

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        scores = response_scores(ctx.model, batch, self.model_inputs(batch))
        loss, chosen, rejected = preference_losses.bradley_terry(scores.chosen, scores.rejected, float(self.settings.margin))
        valid = pairs.valid_pairs(batch)
        metrics = self.pair_sums(valid, {
            "accuracy": chosen > rejected, "margin": chosen - rejected,
            "rewards/chosen": chosen, "rewards/rejected": rejected,
        })
        return jnp.sum(jnp.where(valid, loss, 0.0)), metrics
