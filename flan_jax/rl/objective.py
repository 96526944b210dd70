"""What the GRPO and PPO objectives share: the rollout batch they train on and how the loss is normalised.

They are objectives of the trainer's seam (flan_jax.train.objectives): the same jitted step (micro-
batches, clipping, non-finite guard) takes their update batches. `loop = "rl"` makes
`flan_jax.train.loop.train` hand the run to flan_jax.rl.loop, which samples the rollouts.

A batch is the update layout of flan_jax/rl/batch.py plus per-token `old_logps` (the policy that
sampled, from a scoring pass after generation), `advantages`, and `ref_logps` when there is a KL
term. `prepare` turns the completion mask into per-token loss weights over the WHOLE update batch
(before micro-batching), so micro-batches add up to the full-batch loss exactly:

  loss_type "grpo"     mean over each completion's tokens, then over the completions (DeepSeekMath)
  loss_type "dapo"     mean over all completion tokens of the batch (DAPO; PPO always uses it)
  loss_type "dr_grpo"  token sum / (completions x max_new_tokens) (Dr. GRPO: no length bias)

Logged metrics that are token means (KL, entropy, clip fraction, ...) get their own weights.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

import jax
import jax.numpy as jnp

from flan_jax.rl.batch import LAYOUT_KEYS
from flan_jax.train.objectives.base import Objective, Prepared

LOSS_TYPES = ("grpo", "dapo", "dr_grpo")
TOKEN_WEIGHTS = "rl_token_weights"
METRIC_WEIGHTS = "rl_metric_weights"


class RLObjective(Objective):
    """Base of "grpo" and "ppo" (see the module docstring)."""

    loop: ClassVar[str] = "rl"
    model_heads: ClassVar[tuple[str, ...]] = ()
    rollout_features: ClassVar[tuple[str, ...]] = ("old_logps", "advantages")
    loss_type: str = "dapo"

    def __init__(self, config: Any):
        super().__init__(config)
        rl = self.settings = config.rl
        self.temperature = float(rl.temperature)
        self.kl_coef = float(rl.kl_coef)
        self.epsilon_low = float(rl.epsilon)
        self.epsilon_high = float(rl.epsilon_high) or self.epsilon_low
        self.max_new_tokens = int(rl.max_new_tokens)
        if self.temperature <= 0:
            raise ValueError(f"config.rl.temperature={self.temperature} must be > 0 (RL samples; greedy rollouts have no ratio)")
        if self.kl_coef < 0 or self.epsilon_low <= 0:
            raise ValueError(f"config.rl.kl_coef={self.kl_coef} must be >= 0 and rl.epsilon={self.epsilon_low} > 0")
        # Instance attributes: the reference exists only with a KL term (as trl loads none for beta=0).
        self.frozen_slots = ("reference",) if self.kl_coef else ()
        self.features = LAYOUT_KEYS + self.rollout_features + (("ref_logps",) if self.kl_coef else ())

    def prepare(self, batch: Mapping[str, jax.Array]) -> Prepared:
        mask = batch["completion_mask"].astype(jnp.float32)
        per_row = jnp.sum(mask, axis=1, keepdims=True)
        rows = jnp.sum((per_row > 0).astype(jnp.float32))
        tokens = jnp.sum(mask)
        if self.loss_type == "grpo":
            weights, denominator = mask / jnp.maximum(per_row, 1.0), rows
        elif self.loss_type == "dr_grpo":
            weights, denominator = mask, rows * self.max_new_tokens
        else:
            weights, denominator = mask, tokens
        denominator = jnp.maximum(denominator, 1.0)
        features = {TOKEN_WEIGHTS: weights, METRIC_WEIGHTS: mask * (denominator / jnp.maximum(tokens, 1.0))}
        return Prepared(features=features, denominator=denominator, metrics={"completion_tokens": tokens, "completions": rows})

    def clipped_objective(self, logps: jax.Array, batch: Mapping[str, jax.Array]) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Per-token -min(ratio A, clip(ratio) A) and per-token metrics (ratio, clipped)."""
        advantages = batch["advantages"]
        ratio = jnp.exp(logps - batch["old_logps"])
        clipped = jnp.clip(ratio, 1.0 - self.epsilon_low, 1.0 + self.epsilon_high)
        loss = -jnp.minimum(ratio * advantages, clipped * advantages)
        region = ((ratio < 1.0 - self.epsilon_low) & (advantages < 0)) | ((ratio > 1.0 + self.epsilon_high) & (advantages > 0))
        return loss, {"ratio": jax.lax.stop_gradient(ratio), "clip_fraction": region.astype(jnp.float32)}

    @staticmethod
    def token_sums(batch: Mapping[str, jax.Array], values: Mapping[str, jax.Array]) -> dict[str, jax.Array]:
        """Sums that the step's division by the denominator turns into token means over the update batch."""
        weights = batch[METRIC_WEIGHTS]
        return {name: jnp.sum(jax.lax.stop_gradient(v).astype(jnp.float32) * weights) for name, v in values.items()}


def k3_kl(logps: jax.Array, ref_logps: jax.Array) -> jax.Array:
    """Schulman's k3 estimator of KL(pi || pi_ref) per token: exp(r) - r - 1 with r = log pi_ref - log pi (>= 0)."""
    log_ratio = ref_logps - logps
    return jnp.exp(log_ratio) - log_ratio - 1.0
