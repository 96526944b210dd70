"""Direct preference optimisation and its family: DPO (cDPO with label smoothing), IPO, SimPO.

  "dpo"    -log sigmoid(beta * (log-ratio chosen - log-ratio rejected)); config.objective.label_smoothing
           eps > 0 gives conservative DPO. Log-ratio = policy log-prob - reference log-prob of a response.
  "ipo"    the squared, length-normalised IPO loss (as trl computes it), target 1 / (2 beta).
  "simpo"  reference-free: -log sigmoid(beta * (mean token log-prob chosen - rejected) - gamma).

With config.objective.sft_weight = a > 0, dpo and ipo add a x the chosen response's mean token
negative log-likelihood per pair (RPO, Pang et al. 2024; trl's loss_type=["sigmoid", "sft"] with
weights [1, a], which pools the NLL over the batch's tokens instead of averaging it per pair): plain
DPO on small models tends to lower the likelihood of the chosen responses too.

Per-pair formulas: flan_jax.train.preference_losses (checked against trl 1.16). The reference
log-probs of dpo/ipo come from the cache, the frozen slot or, in LoRA runs, the policy with its
adapters switched off (objectives/pairwise.py). Logged per
step (means over the batch's pairs): loss, rewards/chosen, rewards/rejected, rewards/accuracy
(share with reward chosen > rejected), rewards/margin, logps/chosen, logps/rejected and
logps/drift, the policy's log-prob drift from the reference ((log-ratio chosen + log-ratio
rejected) / 2, a per-sequence KL estimate on these responses; 0 for SimPO, which has no reference).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp

from flan_jax.train import pairs, preference_losses
from flan_jax.train.objectives import register_objective
from flan_jax.train.objectives.base import ObjectiveContext
from flan_jax.train.objectives.pairwise import REFERENCE_FEATURE, PairwiseObjective, reference_log_probs, reference_source


class _ReferencedObjective(PairwiseObjective):
    """DPO and IPO: the loss compares the policy with the reference."""

    compares_with_reference = True  # evaluation scores preference pairs by the implicit reward

    def __init__(self, config: Any):
        super().__init__(config)
        self.beta = float(self.settings.beta)
        if self.beta <= 0:
            raise ValueError(f"config.objective.beta={self.beta} must be > 0")
        self.reference = reference_source(config)  # "cache" | "model" | "adapters_off" (resolved from "auto")
        # Instance attributes: which extra input the run must provide depends on the config.
        self.frozen_slots = ("reference",) if self.reference == "model" else ()
        self.features = PairwiseObjective.features + ((REFERENCE_FEATURE,) if self.reference == "cache" else ())

    def per_pair(self, policy: pairs.PerResponse, reference: pairs.PerResponse, batch) -> preference_losses.Triple:
        raise NotImplementedError

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        policy = self.response_log_probs(ctx.model, batch)
        reference = reference_log_probs(self, ctx, batch)
        loss, chosen, rejected = self.per_pair(policy, reference, batch)
        sft_weight = float(self.settings.sft_weight)
        if sft_weight:  # RPO: + weight x the chosen response's mean token NLL, so its likelihood cannot collapse
            loss = loss - sft_weight * policy.chosen / jnp.maximum(pairs.response_lengths(batch).chosen, 1.0)
        drift = 0.5 * ((policy.chosen - reference.chosen) + (policy.rejected - reference.rejected))
        return _sums(self, batch, loss, chosen, rejected, policy, drift)


def _sums(objective: PairwiseObjective, batch, loss, chosen, rejected, policy: pairs.PerResponse, drift):
    valid = pairs.valid_pairs(batch)
    metrics = objective.pair_sums(valid, {
        "rewards/chosen": chosen, "rewards/rejected": rejected, "rewards/accuracy": chosen > rejected,
        "rewards/margin": chosen - rejected, "logps/chosen": policy.chosen, "logps/rejected": policy.rejected,
        "logps/drift": drift,
    })
    return jnp.sum(jnp.where(valid, loss, 0.0)), metrics


@register_objective("dpo")
class DPO(_ReferencedObjective):
    def per_pair(self, policy, reference, batch):
        return preference_losses.dpo(
            policy.chosen, policy.rejected, reference.chosen, reference.rejected,
            beta=self.beta, label_smoothing=float(self.settings.label_smoothing),
        )


@register_objective("ipo")
class IPO(_ReferencedObjective):
    def per_pair(self, policy, reference, batch):
        lengths = pairs.response_lengths(batch)
        return preference_losses.ipo(
            policy.chosen, policy.rejected, reference.chosen, reference.rejected, lengths.chosen, lengths.rejected,
            beta=self.beta,
        )


@register_objective("simpo")
class SimPO(PairwiseObjective):
    def __init__(self, config: Any):
        super().__init__(config)
        self.beta, self.gamma = float(self.settings.beta), float(self.settings.simpo_gamma)
        if self.beta <= 0:
            raise ValueError(f"config.objective.beta={self.beta} must be > 0")

    def loss_sum(self, ctx: ObjectiveContext, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict]:
        policy = self.response_log_probs(ctx.model, batch)
        lengths = pairs.response_lengths(batch)
        loss, chosen, rejected = preference_losses.simpo(
            policy.chosen, policy.rejected, lengths.chosen, lengths.rejected, beta=self.beta, gamma=self.gamma,
            label_smoothing=float(self.settings.label_smoothing),
        )
        return _sums(self, batch, loss, chosen, rejected, policy, jnp.zeros_like(loss))
